"""MindSkip on the sparse MoE blocks of mixture-of-experts models (granularity ``moe``): tiny
random Mixtral, Qwen2-MoE (with its shared expert), Qwen3-MoE and OLMoE (hidden 32, 4 layers,
4 experts, top-2). Exactness, real skipping (a skipped token reaches no expert router), cache
consistency, batch invariance, router logits and the auxiliary loss, save/load, unload, the
expert load, Router-Tuning, the profiler's variants and cost model on MoE blocks and the plan of
an MoE config (OLMoE-1B-7B shapes)."""

import json
from pathlib import Path

import pytest
import torch

from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.mindskip.checkpoint import CONFIG_NAME
from rt_lib.mindskip.model import MindSkipModel, get_mindskip_model
from rt_lib.mindskip.moe import ExpertCall, block_of, expert_router, is_moe_block, load_balancing_loss, moe_layers
from rt_lib.mindskip.removal import drop_sublayers
from rt_lib.speed.moe_load import expert_load, summarise, write_expert_load
from tiny_models import (MOE_ARCHS, assert_batch_invariant, decode_then_rewound_decode, greedy_uncached, logits,
                         padded_batch, prefill_and_decode_logits, random_routers, tiny_model, tiny_moe)

ARCHS = sorted(MOE_ARCHS)
LEVELS = ("seq", "token")
ROUTED = [1, 2]  # of 4 layers


def routed_moe(arch, level="seq", layers=ROUTED, seed=None, **cfg):
    model = tiny_moe(arch)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=list(layers), granularity="moe", route_level=level,
                                                  **cfg))
    ms.eval()
    if seed is not None:
        random_routers(ms, seed=seed)
    return model, ms


def mixed_routers(ms, ids, mask, seeds=range(20)):
    """Give the routers the first seed whose decisions are mixed at every routed layer."""
    for seed in seeds:
        random_routers(ms, seed=seed)
        logits(ms.model, ids, mask)
        keep = ms.decisions()
        real = mask.bool()
        if all(0 < int((d & real if d.ndim == 2 else d).sum()) < (int(real.sum()) if d.ndim == 2 else d.numel())
               for d in keep.values()):
            return seed
    raise AssertionError("no router seed mixes the decisions at every routed layer")


def find_layers(model):
    from rt_lib.mindskip.architecture import find_decoder

    return find_decoder(model)[1]


class RouterRows:
    """Rows each MoE layer's expert router is given (hooks on the routers of the base blocks)."""

    def __init__(self, model):
        layers = find_layers(model)
        self.rows: dict[int, list[torch.Tensor]] = {}
        self.handles = [expert_router(block_of(layers, i)).register_forward_hook(self._hook(i))
                        for i in moe_layers(layers)]

    def _hook(self, i):
        def hook(module, args, output):
            self.rows.setdefault(i, []).append(args[0].reshape(-1, args[0].shape[-1]).detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------- structure
@pytest.mark.parametrize("arch", ARCHS)
def test_moe_blocks_are_found_and_only_moe_routes_them(arch):
    model = tiny_moe(arch)
    layers = find_layers(model)
    assert moe_layers(layers) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="use granularity 'moe'"):
        get_mindskip_model(model, MindSkipConfig(routed_layers=[1], granularity="mlp"))
    with pytest.raises(ValueError, match="gate them with granularity 'moe'"):
        get_mindskip_model(model, MindSkipConfig(num_routed_layers=2, granularity="mlp"))
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=2, granularity="moe"))
    assert ms.routed_layers == [1, 2]
    for i, g in ms.gates.items():
        assert layers[i].mlp is g and is_moe_block(g.base_layer)
        assert g.base_layer.gate is expert_router(g.base_layer)  # the gate reads through to the block
    ms.unload()


def test_moe_granularity_refuses_dense_layers():
    with pytest.raises(ValueError, match="no sparse MoE block"):
        get_mindskip_model(tiny_model("llama"), MindSkipConfig(num_routed_layers=2, granularity="moe"))
    # Qwen2-MoE with a dense MLP at layer 2: the default range leaves it out, naming it is an error
    model = tiny_moe("qwen2_moe", mlp_only_layers=[2])
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=2, granularity="moe"))
    assert ms.routed_layers == [1]
    ms.unload()
    with pytest.raises(ValueError, match=r"layer 2: its MLP is dense"):
        get_mindskip_model(model, MindSkipConfig(routed_layers=[1, 2], granularity="moe"))
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2], granularity="mlp"))  # the dense one: mlp
    ms.unload()


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("level", LEVELS)
def test_zero_init_equals_base_and_unload_restores(arch, level):
    model = tiny_moe(arch)
    ids, mask = padded_batch([9, 6, 4])
    ref = logits(model, ids, mask)
    modules_before = list(model.named_modules())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=ROUTED, granularity="moe", route_level=level))
    ms.eval()
    real = mask.bool()
    out = logits(model, ids, mask)  # zero-initialised routers: r = 0.5 = threshold, every token kept
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=0)
    assert ms.capacities() == {i: 1.0 for i in ROUTED}
    base = ms.unload()
    assert base is model
    assert list(base.named_modules()) == modules_before
    assert set(base.state_dict()) == set(state_before)
    assert all(torch.equal(state_before[k], v) for k, v in base.state_dict().items())
    assert torch.equal(logits(base, ids, mask), ref)
    assert not base._forward_hooks and not base._forward_pre_hooks  # the router-logit hooks are gone
    for i in moe_layers(find_layers(base)):
        assert not expert_router(block_of(find_layers(base), i))._forward_hooks


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("level", LEVELS)
def test_skip_equals_mask_and_skipped_tokens_reach_no_expert_router(arch, level):
    """Mixed decisions at both routed layers: running the block on the kept rows/tokens only
    gives what compute-everything-then-mask gives, and each routed layer's expert router is
    handed exactly the kept tokens (seq: the kept rows, padding included; token: the kept real
    tokens), no others."""
    model, ms = routed_moe(arch, level)
    ids, mask = padded_batch([8, 5, 7])
    mixed_routers(ms, ids, mask)
    rows = RouterRows(model)
    out_skip = logits(model, ids, mask)
    rows.remove()
    keep = {i: d.clone() for i, d in ms.decisions().items()}
    ms.set_execution("mask")
    full = RouterRows(model)
    out_mask = logits(model, ids, mask)
    full.remove()
    assert all(torch.equal(keep[i], d) for i, d in ms.decisions().items())
    real = mask.bool()
    torch.testing.assert_close(out_skip[real], out_mask[real], atol=1e-5, rtol=0)
    bsz, t = ids.shape
    for i in range(4):
        (seen,), (every,) = rows.rows.get(i, [None]), full.rows[i]
        assert every.shape[0] == bsz * t
        if i not in ROUTED:
            torch.testing.assert_close(seen, every, atol=1e-5, rtol=0)
            continue
        sent = keep[i].view(-1, 1).expand(bsz, t) if level == "seq" else keep[i]
        assert seen.shape[0] == int(sent.sum()) < bsz * t  # fewer rows: real skipping
        torch.testing.assert_close(seen, every[sent.reshape(-1)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_forced_skip_equals_removed_block(arch):
    model, ms = routed_moe(arch)
    ids, mask = padded_batch([8, 5])
    ms.force({2: False})
    out = logits(model, ids, mask)
    assert ms.capacities() == {1: 1.0, 2: 0.0}
    ms.unload()
    removed = drop_sublayers(model, [2], granularity="moe")
    ref = logits(model, ids, mask)
    removed.restore()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert not torch.allclose(ref, logits(model, ids, mask), atol=1e-3)  # the removal mattered
    with pytest.raises(ValueError, match="no sparse MoE block"):
        drop_sublayers(tiny_model("llama"), [2], granularity="moe")


# ---------------------------------------------------------------------------- caches


def _beam(model, ids, mask, steps=4, beams=3, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                          num_beams=beams, do_sample=False, pad_token_id=0, length_penalty=0.0,
                          output_scores=True, return_dict_in_generate=True, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("level", LEVELS)
def test_cached_generation_equals_recomputation(arch, level):
    """Greedy: the cached generate equals a loop that recomputes every prefix without a cache
    (same tokens, logits within 1e-4); beam search: cached equals uncached. Sequence routing
    decides once at prefill: the uncached runs replay those decisions."""
    model, ms = routed_moe(arch, level)
    ids, mask = padded_batch([9, 5, 7], seed=2)
    mixed_routers(ms, ids, mask)
    ms.reset_stats()
    out = ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, output_scores=True,
                      return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    assert 0.0 < ms.skip_ratio() < 1.0
    prefill = {i: d.clone() for i, d in ms.decisions().items()}
    if level == "seq":
        ms.force(prefill)
    ref_ids, ref_logits = greedy_uncached(model, ids, mask, 5)
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.scores, 1), ref_logits, atol=1e-4, rtol=0)
    if level == "seq":  # every beam of a prompt keeps the prompt's decision
        ms.force({i: d.repeat_interleave(3) for i, d in prefill.items()})
    beam = _beam(ms, ids, mask)
    beam_ref = _beam(ms, ids, mask, use_cache=False)
    assert torch.equal(beam.sequences, beam_ref.sequences)
    torch.testing.assert_close(beam.sequences_scores, beam_ref.sequences_scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("level", LEVELS)
def test_batch_invariance_with_padding(arch, level):
    model, ms = routed_moe(arch, level, layers=[1, 2, 3])
    side = "right" if arch == "olmoe" else "left"
    ids, mask = padded_batch([10, 4, 7], side=side, seed=1)
    mixed_routers(ms, ids, mask)
    assert_batch_invariant(model, ms, ids, mask, level)


# ---------------------------------------------------------------------------- router logits and aux loss
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("level", LEVELS)
def test_router_logits_and_aux_loss_cover_the_tokens_that_reached_each_block(arch, level):
    """``output_router_logits=True`` with an attention mask: nothing skipped gives the model's
    own router logits, auxiliary loss and loss; with mixed decisions each routed layer's entry
    holds the rows of the tokens that reached its block (what compute-then-mask gives at those
    tokens), and the auxiliary loss is the models' formula over exactly those rows."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = tiny_moe(arch)
    ids, mask = padded_batch([8, 5, 7])
    kw = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), output_router_logits=True)
    with torch.no_grad():
        ref = model(**kw)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=ROUTED, granularity="moe", route_level=level))
    ms.eval()
    with torch.no_grad():
        kept_all = model(**kw)  # zero-initialised routers: every token reaches every block
    flat_real = mask.bool().reshape(-1)
    for i, (a, b) in enumerate(zip(kept_all.router_logits, ref.router_logits, strict=True)):
        # token routing never hands padding tokens to a routed block
        torch.testing.assert_close(a, b[flat_real] if level == "token" and i in ROUTED else b, atol=1e-5, rtol=0)
    torch.testing.assert_close(kept_all.aux_loss, ref.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(kept_all.loss, ref.loss, atol=1e-5, rtol=0)

    mixed_routers(ms, ids, mask)
    with torch.no_grad():
        out = model(**kw)
        keep = {i: d.clone() for i, d in ms.decisions().items()}
        ms.set_execution("mask")
        full = model(**kw)  # every token reaches every block: transformers' own output
        ms.set_execution("skip")
    bsz, t = ids.shape
    real = mask.bool()
    expected = []
    for i, (got, every) in enumerate(zip(out.router_logits, full.router_logits)):
        sent = torch.ones(bsz, t, dtype=torch.bool)
        if i in keep:
            sent = keep[i].view(-1, 1).expand(bsz, t) if level == "seq" else keep[i]
        assert got.shape[0] == int(sent.sum())
        torch.testing.assert_close(got, every[sent.reshape(-1)], atol=1e-5, rtol=0)
        expected.append(ExpertCall(i, every[sent.reshape(-1)], None, sent, real[sent]))
    n_exp, top_k = expert_router(block_of(find_layers(model), 0)).num_experts, model.config.num_experts_per_tok
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(expected, n_exp, top_k), atol=1e-6, rtol=0)
    assert not torch.allclose(out.aux_loss, full.aux_loss)  # the skipped tokens count nowhere
    torch.testing.assert_close(out.loss - model.router_aux_loss_coef * out.aux_loss,
                               model(**{**kw, "output_router_logits": False}).loss, atol=1e-5, rtol=0)
    # without an attention mask the models' own formula over the same rows agrees
    with torch.no_grad():
        nomask = model(input_ids=ids, output_router_logits=True)
    torch.testing.assert_close(nomask.aux_loss, load_balancing_loss_func(nomask.router_logits, n_exp, top_k, None),
                               atol=1e-6, rtol=0)


def test_load_balancing_loss_equals_the_models_own_when_every_token_is_there():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(12, 4, generator=g) for _ in range(3)]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    real = mask.bool().reshape(-1)
    calls = [ExpertCall(i, lg, None, mask.bool(), real) for i, lg in enumerate(logits)]
    torch.testing.assert_close(load_balancing_loss(calls, 4, 2), load_balancing_loss_func(tuple(logits), 4, 2, mask),
                               atol=1e-6, rtol=0)


def test_block_granularity_on_an_moe_model_refuses_router_logits_while_skipping():
    model = tiny_moe("olmoe")
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=ROUTED, granularity="block"))
    ms.eval()
    ids, mask = padded_batch([6, 4])
    logits(model, ids, mask)  # without router logits: fine
    with pytest.raises(ValueError, match="granularity 'moe'"):
        logits(model, ids, mask, output_router_logits=True)
    ms.set_execution("mask")
    logits(model, ids, mask, output_router_logits=True)
    ms.unload()


# ---------------------------------------------------------------------------- save / load
def test_save_load_round_trip_with_digest(tmp_path):
    model, ms = routed_moe("qwen2_moe", "token", seed=3)
    ids, mask = padded_batch([7, 4])
    before = logits(model, ids, mask)
    ms.save_pretrained(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / CONFIG_NAME).read_text())
    assert meta["config"]["granularity"] == "moe" and meta["model_type"] == "qwen2_moe"
    ms.unload()
    ms2 = MindSkipModel.from_pretrained(model, tmp_path / "r")
    ms2.eval()
    assert ms2.config.granularity == "moe" and ms2.routed_layers == ROUTED
    torch.testing.assert_close(logits(model, ids, mask), before, atol=0, rtol=0)
    ms2.unload()
    meta["config"]["granularity"] = "mlp"  # edited after saving: refused
    (tmp_path / "r" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="changed after saving"):
        MindSkipModel.from_pretrained(model, tmp_path / "r")
    with pytest.raises(ValueError, match="does not fit this model"):
        MindSkipModel.from_pretrained(tiny_moe("olmoe"), tmp_path / "r")


# ---------------------------------------------------------------------------- expert load
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_load_assigned_vs_executed(arch, tmp_path):
    model, ms = routed_moe(arch, "token")
    batches = [padded_batch([8, 5, 7], seed=s) for s in (0, 1)]
    batches = [{"input_ids": i, "attention_mask": m} for i, m in batches]
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    top_k = model.config.num_experts_per_tok

    # nothing skipped: the three counts agree everywhere
    rows = expert_load(ms, batches)
    assert {(r["layer"], r["expert"]) for r in rows} == {(i, e) for i in range(4) for e in range(4)}
    assert all(r["assigned"] == r["executed"] == r["routed_assigned"] for r in rows)
    assert all(s["assigned"] == top_k * real_tokens for s in summarise(rows))

    mixed_routers(ms, batches[0]["input_ids"], batches[0]["attention_mask"])
    rows = expert_load(ms, batches)
    for r in rows:
        assert r["executed"] <= r["routed_assigned"], r
        if r["layer"] <= ROUTED[0]:  # nothing skipped before it: the dense bound holds
            assert r["executed"] <= r["assigned"], r
        if not r["routed"]:
            assert r["executed"] == r["routed_assigned"]
    per_layer = {s["layer"]: s for s in summarise(rows)}
    for i in ROUTED:
        s = per_layer[i]
        assert s["routed_assigned"] == s["assigned"] == top_k * real_tokens
        assert 0 < s["executed"] < s["assigned"]
    # executed = top_k x the kept real tokens, batch by batch
    kept = 0
    for b in batches:
        logits(model, b["input_ids"], b["attention_mask"])
        kept += int(ms.decisions()[ROUTED[1]].sum())
    assert per_layer[ROUTED[1]]["executed"] == top_k * kept
    # a layer the routers skip entirely executes nothing
    ms.force({1: False})
    rows = expert_load(ms, batches)
    assert all(r["executed"] == 0 for r in rows if r["layer"] == 1)
    assert all(r["routed_assigned"] == r["assigned"] for r in rows if r["layer"] == 1)
    files = write_expert_load(rows, tmp_path / "load")
    text = files["csv"].read_text().splitlines()
    assert text[0] == "layer,expert,routed,assigned,routed_assigned,executed" and len(text) == 1 + 16
    assert files["figure"].stat().st_size > 0


def test_expert_load_step_of_a_run_folder(tmp_path):
    """record_step: moe/expert_load.csv and .png in the run folder, the per-layer totals in
    run.json steps.moe and the measurement's settings in parameters.moe."""
    from rt_lib.runs.record import load_run, new_run
    from rt_lib.speed.moe_load import record_step

    model, ms = routed_moe("olmoe", "token", seed=1)
    ids, mask = padded_batch([8, 5])
    rows = expert_load(ms, [{"input_ids": ids, "attention_mask": mask}])
    run = new_run(root=tmp_path, run_id="r")
    out = record_step(run, rows, {"text": "padded random ids", "batches": 1})
    assert out == run / "moe" and (out / "expert_load.csv").is_file() and (out / "expert_load.png").stat().st_size > 0
    meta = load_run(run)
    assert meta["parameters"]["moe"] == {"text": "padded random ids", "batches": 1}
    step = meta["steps"]["moe"]
    assert step["files"] == ["moe/expert_load.csv", "moe/expert_load.png"]
    assert step["layers"] == json.loads(json.dumps(summarise(rows)))


def test_expert_load_needs_moe_routing_and_eval_mode():
    model = tiny_moe("olmoe")
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=ROUTED, granularity="attn"))
    with pytest.raises(ValueError, match="granularity 'moe'"):
        expert_load(ms, [torch.ones(1, 4, dtype=torch.long)])
    ms.unload()
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=ROUTED, granularity="moe"))
    ms.train()
    with pytest.raises(ValueError, match="eval"):
        expert_load(ms, [torch.ones(1, 4, dtype=torch.long)])


def test_expert_load_first_routed_layer_never_exceeds_the_dense_assignment():
    """One routed layer: every layer before it is dense, so executed <= assigned per expert
    there, and the layers after it see the skip's effect on the hidden states."""
    model, ms = routed_moe("mixtral", "token", layers=[2])
    ids, mask = padded_batch([12, 9, 11], seed=4)
    mixed_routers(ms, ids, mask)
    rows = expert_load(ms, [{"input_ids": ids, "attention_mask": mask}])
    at = [r for r in rows if r["layer"] == 2]
    assert all(r["executed"] <= r["assigned"] == r["routed_assigned"] for r in at)
    assert sum(r["executed"] for r in at) < sum(r["assigned"] for r in at)
    assert all(r["executed"] == r["assigned"] for r in rows if r["layer"] < 2)


# ---------------------------------------------------------------------------- Router-Tuning
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("level", LEVELS)
def test_training_step_trains_routers_only_and_regularises_moe_capacity(arch, level):
    """ms.train(): hard decisions, full compute, straight-through gradients to the MindSkip
    routers only; the capacity regulariser reads the `moe` gates. Mixtral with router jitter:
    its in-place jitter must not break the routers' graph."""
    over = {"router_jitter_noise": 0.1} if arch == "mixtral" else {}
    model = tiny_moe(arch, **over)
    experts_before = {n: p.clone() for n, p in model.named_parameters()}
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=ROUTED, granularity="moe", route_level=level,
                                                  reg_lambda=0.1, capacity_target=0.25))
    ms.train()
    ids, mask = padded_batch([8, 6])
    out = ms(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    (out.loss + ms.regularizer()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("mindskip_router" in n for n in trainable) and len(trainable) == len(ROUTED)
    for p in ms.router_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        if "mindskip_router" not in n:
            assert p.grad is None, n
    assert set(ms.batch_capacities()) == set(ROUTED)
    torch.testing.assert_close(ms.regularizer(), torch.tensor(0.1 * 2 * 0.75), rtol=0, atol=1e-6)
    ms.unload()
    assert all(torch.equal(experts_before[n], p) for n, p in model.named_parameters())


def test_router_tuning_run_on_a_tiny_moe_model(tmp_path):
    """Router-Tuning end to end on a tiny OLMoE: routers move, every backbone tensor
    (expert routers and experts included) stays bit for bit, capacities are logged for the
    `moe` layers and the routers save and load."""
    from test_train import instructions

    from rt_lib.tuning.data import byte_tokenizer
    from rt_lib.tuning.train import train_routers

    tok = byte_tokenizer()
    model = tiny_moe("olmoe", vocab_size=len(tok), max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
                     pad_token_id=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    routers_before = {i: expert_router(block_of(find_layers(model), i)).weight.clone() for i in range(4)}
    res = train_routers(None, model=model, tokenizer=tok, data=instructions(), out=str(tmp_path / "run"),
                        num_samples=24, heldout_samples=8, max_length=64, granularity="moe", route_level="token",
                        num_routed_layers=2, batch_size=8, micro_batch_size=4, lr=1e-2, reg_lambda=0.5, max_steps=3,
                        warmup_ratio=0.0, precision="fp32", seed=0, progress=False, threads=1)
    assert res.ms.config.granularity == "moe" and res.ms.routed_layers == [1, 2]
    assert all(r.weight.abs().sum() > 0 for r in res.ms.routers().values())
    assert [set(k for k in row if k.startswith("capacity_L")) for row in res.log] == [{"capacity_L1", "capacity_L2"}] * 3
    assert res.log[0]["reg_loss"] == pytest.approx(0.5 * 2 * 0.5)  # every token kept at step 1, target 0.5
    after = res.ms.unload().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(routers_before[i], expert_router(block_of(find_layers(model), i)).weight) for i in range(4))
    saved = Path(res.run_dir) / "train" / "routers"
    ms = MindSkipModel.from_pretrained(model, saved, strict_base=False)
    assert ms.config.granularity == "moe"


# ---------------------------------------------------------------------------- plan
OLMOE = Path(__file__).resolve().parent / "fixtures" / "olmoe-1b-7b-config"


def test_plan_counts_total_active_and_router_parameters_of_olmoe():
    """OLMoE-1B-7B (its public config: 16 layers, hidden 2048, 64 experts of width 1024, top-8,
    vocabulary 50,304): about 6.9 B parameters, about 1.3 B active per token."""
    import io

    from rt_lib.pipeline import plan as P

    opts = dict(model=str(OLMOE), gpu_memory="80GiB", eval_tokens="no",
                train_overrides={"granularity": "moe", "num_routed_layers": 14})
    plan = P.make_plan("paper", **opts)
    m, t = plan["model"], plan["train"]
    assert m["shape"]["architecture"] == "OlmoeForCausalLM"
    moe = m["moe"]
    assert moe["experts"] == 64 and moe["top_k"] == 8 and moe["moe_layers"] == 16
    assert m["parameters"] == 6_919_161_856 and round(m["parameters"] / 1e9, 1) == 6.9
    assert moe["active_parameters"] == 1_282_017_280 and round(moe["active_parameters"] / 1e9, 1) == 1.3
    assert moe["expert_parameters"] == 16 * 64 * 3 * 2048 * 1024
    assert moe["expert_router_parameters"] == 16 * 64 * 2048 and moe["shared_expert_parameters"] == 0
    assert t["granularity"] == "moe" and t["routed_layers"] == list(range(1, 15))
    assert t["router_parameters"] == 14 * 2048
    assert "MoE model" in plan["profile"]["note"]
    out = io.StringIO()
    assert P.run("paper", stream=out, **opts) == 0
    text = out.getvalue()
    for line in ("parameters   6,919,161,856 (6.92 B)", "16 sparse layers x 64 experts, top-8",
                 "1,282,017,280 (1.28 B) active per token", "14 layers (1..14) x 2048 = 28,672 parameters"):
        assert line in text, line


# ---------------------------------------------------------------------------- profiling
def moe_hand_shape(sparse_layers=4, shared=0):
    """hidden 8, 2 heads of 4, 1 KV head, dense MLP 16, vocab 32, 4 layers (tests/test_profiling.py's
    hand config) with 4 experts of width 8, top-2."""
    from rt_lib.speed.roofline import Shape

    return Shape(4, 8, 2, 1, 4, 16, 32, experts=4, top_k=2, expert_intermediate=8, shared_intermediate=shared,
                 sparse_layers=sparse_layers)


def test_roofline_costs_moe_blocks_hand_checked():
    from rt_lib.speed import roofline as R

    shape = moe_hand_shape()
    # prefill, batch 1, 2 tokens, 2-byte dtype (attention, MLP, head as tests/test_profiling.py)
    c = R.step_costs(shape, batch=1, new=2, past=0, dtype_bytes=2, head_tokens=1)
    assert c["attn"] == (864, 704) and c["mlp"] == (1536, 1216) and c["head"] == (512, 592)
    # flops: router 2*2*8*4 = 128, experts 2*2*2*8*8*3 = 1536; 2 tokens touch 4*(1 - (1/2)^2) = 3
    # experts: weights 8*4 + 3*3*8*8 = 608; activations 2*2*8 + 2*2*(2*8 + 2*3*8) = 288
    assert c["moe"] == (1664, pytest.approx(2 * (608 + 288)))
    # decode, batch 1: one token reads exactly its top-2 experts (weights 32 + 2*192 = 416),
    # activations 2*8 + 2*(2*8 + 2*3*8) = 144
    assert R.experts_touched(shape, 1) == pytest.approx(2.0)
    assert R.step_costs(shape, 1, 1, 5, 2)["moe"] == (832, pytest.approx(2 * (416 + 16 + 128)))
    assert R.experts_touched(shape, 10_000) == pytest.approx(4.0)
    args = {"regime": "prefill", "batch": 1, "seq_len": 2, "dtype_bytes": 2, "peak_flops": 1, "bandwidth": 1e30}
    # compute-bound: 4*864 + 4*1664 + 512 = 10624; two MoE blocks removed: minus 2*1664
    assert R.bound_speedup(shape, removed=2, granularity="moe", **args) == pytest.approx(10624 / 7296)
    assert R.bound_speedup(shape, removed=0, granularity="moe", **args) == 1.0
    # half the layers sparse: a removed layer's MLP slot costs the mean, (1536 + 1664) / 2
    mixed = moe_hand_shape(sparse_layers=2)
    assert R.bound_speedup(mixed, removed=2, granularity="block", **args) == \
        pytest.approx((3456 + 6400 + 512) / (3456 + 6400 + 512 - 2 * 864 - 2 * 1600))
    assert R.bound_speedup(mixed, removed=1, granularity="mlp", **args) == pytest.approx(10368 / (10368 - 1536))
    # activations of the memory estimate, per token: 4 router logits + 2 experts x (8 + 3*8)
    # = 68 in place of a dense MLP's 3*16; decode batch 2, context 3: 2*3*(32 + 68 + 32)*2 bytes
    assert R.estimate_point_bytes(shape, "decode", 2, 3, 1, 2) == 512 + 1584 + 96 + 256
    with pytest.raises(ValueError, match="has none"):
        R.bound_speedup(R.Shape(4, 8, 2, 1, 4, 16, 32), removed=1, granularity="moe", **args)
    with pytest.raises(ValueError, match="granularity 'moe'"):
        R.bound_speedup(shape, removed=1, granularity="mlp", **args)


@pytest.mark.parametrize("arch", ARCHS)
def test_roofline_shape_reads_the_moe_config(arch):
    from rt_lib.speed.roofline import Shape

    model = tiny_moe(arch, **({"mlp_only_layers": [2]} if arch == "qwen2_moe" else {}))
    s = Shape.from_config(model.config)
    assert (s.experts, s.top_k, s.expert_intermediate) == (4, 2, 32)
    assert s.shared_intermediate == (48 if arch == "qwen2_moe" else 0)
    assert s.sparse_layers == len(moe_layers(find_layers(model))) == (3 if arch == "qwen2_moe" else 4)
    assert Shape.from_config(tiny_model("llama").config).experts == 0


PROFILE_SKIP = [2]  # of the routed layers [1, 2]


def moe_profile(arch="olmoe", level="seq", **kw):
    from rt_lib.speed import profiling as P

    model, ms = routed_moe(arch, level)
    settings = P.grid("smoke", **{"skip_layers": PROFILE_SKIP, "prefill_batch_sizes": [2], "decode_batch_sizes": [2],
                                  "warmup": 0, "repeats": 1, "peak_flops": 1e12, "bandwidth": 1e11, "threads": 1,
                                  **kw})
    rows, cond = P.profile(ms, settings, progress=False)
    return ms, rows, cond


@pytest.fixture
def one_thread():
    """One CPU thread for every call (the smoke preset's `threads` and `prefill_threads`), and the
    count the next test had afterwards: tiny models gain nothing from more, and threads spinning
    against other jobs on a busy machine slow them many times."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("regime", ["prefill", "decode"])
def test_profiler_times_every_variant_on_an_moe_model(regime, one_thread):
    """Tiny OLMoE, MoE blocks of layers 1 and 2 routed, layer 2 forced off, batch 2: every
    variant runs; moe skipping stores every key and value; the realised skip ratio is the forced
    one; the bound adds up the dense model's hooked time of the skipped MoE block; static drop
    (an attention drop) is left out with its reason."""
    ms, rows, cond = moe_profile(threshold=0.75, regimes=[regime], new_tokens=2)
    variants = ["dense", "mindskip_forced", "mindskip", "oracle", "mask"]
    assert [(r["regime"], r["variant"], r["batch_size"]) for r in rows] == [(regime, v, 2) for v in variants]
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows)
    assert "attention" in cond["omitted"]["static_drop"] and cond["static_layers"] is None
    assert cond["granularity"] == "moe" and cond["skip_layers"] == PROFILE_SKIP
    half = len(PROFILE_SKIP) / len(ROUTED)
    at = {r["variant"]: r for r in rows}
    assert at["dense"]["kv_bytes"] > 0
    assert {r["kv_bytes"] for r in at.values()} == {at["dense"]["kv_bytes"]}  # no attention skipped
    assert at["mindskip_forced"]["skip_ratio"] == at["mask"]["skip_ratio"] == at["oracle"]["skip_ratio"] == half
    assert at["mindskip"]["skip_ratio"] == 1.0  # zero-init routers score 0.5 < 0.75: every block skipped
    assert at["dense"]["skip_ratio"] == 0.0 and at["dense"]["bound_speedup"] == 1.0
    sub = next(t for t in cond["sublayer_times"] if t["regime"] == regime)
    assert {k.split(".")[1] for k in sub["sublayer_ms"]} == {"attn", "moe", "block"}  # no dense MLP here
    total, times = sub["dense_hooked_ms"], sub["sublayer_ms"]
    for name in ("mindskip_forced", "oracle", "mask"):
        assert at[name]["bound_speedup"] == pytest.approx(total / (total - times["2.moe"]))
    assert at["mindskip"]["bound_speedup"] == pytest.approx(total / (total - times["1.moe"] - times["2.moe"]))
    assert at["oracle"]["roofline_speedup"] > 1.0
    curve = next(c for c in cond["bound_curves"] if c["regime"] == regime)
    assert at["oracle"]["roofline_speedup"] == pytest.approx(curve["bound_speedup"][1])
    assert all(g.forced is None and g.execution == "skip" for g in ms.gates.values())
    assert not any(type(m).__name__ == "_Removed" for m in ms.model.modules())


def test_profiler_times_static_drop_on_an_moe_model_when_given_layers(one_thread):
    _, rows, cond = moe_profile("mixtral", "token", variants=["dense", "oracle", "static_drop"], static_layers=[1],
                                regimes=["prefill"])
    at = {r["variant"]: r for r in rows}
    assert cond["omitted"] == {} and cond["static_layers"] == [1]
    assert at["static_drop"]["kv_bytes"] * 4 == at["dense"]["kv_bytes"] * 3  # attention of 1 of 4 layers removed
    assert at["oracle"]["kv_bytes"] == at["dense"]["kv_bytes"]


@pytest.mark.parametrize("level", LEVELS)
def test_oracle_and_forced_skip_give_identical_logits_on_moe(level):
    """Prefill and three cached decode steps: the forced skip of layer 2's MoE block equals the
    model with that block removed; mask computes it and multiplies by 0."""
    from rt_lib.speed import timing as T
    from rt_lib.speed import variants as V

    _, ms = routed_moe("qwen2_moe", level)
    variants = {v.name: v for v in V.build_variants(ms, ["mindskip_forced", "oracle", "mask", "dense"], PROFILE_SKIP)}
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    steps = torch.randint(3, 96, (2, 3), generator=torch.Generator().manual_seed(2))

    def run(v):
        return prefill_and_decode_logits(v, ids, steps)

    oracle = run(variants["oracle"])
    torch.testing.assert_close(run(variants["mindskip_forced"]), oracle, atol=1e-6, rtol=0)
    torch.testing.assert_close(run(variants["mask"]), oracle, atol=1e-6, rtol=0)
    assert not torch.allclose(run(variants["dense"]), oracle, atol=1e-3)


def test_token_routed_moe_decode_rewinds_like_a_fresh_prefill():
    """Token routing of MoE blocks keeps nothing per cache slot: the profiler rewinds a
    prefilled context instead of prefilling it again each round, and the rewound decode gives
    the logits of the first one, after another variant's prefill."""
    from rt_lib.speed import variants as V

    _, ms = routed_moe("olmoe", "token", seed=0)
    variants = {v.name: v for v in V.build_variants(ms, ["mindskip", "mindskip_forced"], PROFILE_SKIP)}
    assert variants["mindskip"].rewindable
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    prompt, steps = ids[:, :6], ids[:, 6:]

    first, again, ratio = decode_then_rewound_decode(ms, variants, prompt, steps)
    assert 0.0 < ratio < 1.0
    for a, b in zip(first, again):
        assert torch.equal(a, b)

"""MindSkip core: exactness, real skipping, cache consistency (sliding windows, beam search), save/load."""

import json
import re

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.mindskip.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from rt_lib.mindskip.generation import compare_generations
from rt_lib.mindskip.model import MindSkipModel, get_mindskip_model
from rt_lib.mindskip.removal import drop_sublayers
from rt_lib.speed.timing import forward_step
from tiny_models import ARCHS, assert_batch_invariant, greedy_uncached, logits, padded_batch, random_routers, tiny_model

GRANS = ("attn", "mlp", "block")


# ---------------------------------------------------------------------------- config
def test_config_round_trip_and_defaults(tmp_path):
    cfg = MindSkipConfig(num_routed_layers=4, granularity="block", route_level="token", threshold=0.6)
    cfg.save(tmp_path / "c.json")
    assert MindSkipConfig.load(tmp_path / "c.json") == cfg
    # paper default: deepest n except the last -> 15..30 of a 32-layer model
    assert MindSkipConfig().resolve_layers(32) == list(range(15, 31))
    assert MindSkipConfig(routed_layers=[5, 3, 5]).resolve_layers(8) == [3, 5]
    assert set(MindSkipConfig.help()) == set(cfg.to_dict())
    assert all(MindSkipConfig.help().values())


@pytest.mark.parametrize("bad", [dict(granularity="ffn"), dict(route_level="batch"), dict(routed_layers=[]),
                                 dict(num_routed_layers=0), dict(capacity_target=1.5), dict(reg_lambda=-1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        MindSkipConfig(**bad)


def test_config_rejects_layers_outside_model():
    with pytest.raises(ValueError, match="do not exist"):
        MindSkipConfig(routed_layers=[9]).resolve_layers(6)
    with pytest.raises(ValueError, match="too many"):
        MindSkipConfig(num_routed_layers=5).resolve_layers(6)
    with pytest.raises(ValueError, match="unknown MindSkipConfig fields"):
        MindSkipConfig.from_dict({"thresh": 0.5})


class _CharTokenizer:
    """Enough of a tokenizer for ``generate``: one id per character."""

    pad_token_id = 0

    def __call__(self, text, return_tensors="pt"):
        from transformers import BatchEncoding

        ids = torch.tensor([[3 + ord(c) % 90 for c in text]])
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids.tolist()))


def test_compare_generations_restores_the_forcing_it_found():
    ms = get_mindskip_model(tiny_model(), MindSkipConfig(num_routed_layers=2))
    random_routers(ms)
    ms.eval()
    layer = ms.routed_layers[0]
    ms.force({layer: False})
    before = {i: g.forced for i, g in ms.gates.items()}
    texts = compare_generations(ms, _CharTokenizer(), "a prompt", max_new_tokens=3)
    assert set(texts) == {"dense", "mindskip"} and texts["dense"][1] == 0.0
    assert all(len(text.split()) == 3 for text, _ in texts.values())
    assert {i: g.forced for i, g in ms.gates.items()} == before


@pytest.mark.parametrize("failing", ["dense", "mindskip"])
def test_an_error_during_generation_leaves_the_model_unforced(monkeypatch, failing):
    """The dense pass forces every router to keep; an error in either pass must not leave the
    model forced (it would silently run dense from then on)."""
    ms = get_mindskip_model(tiny_model(), MindSkipConfig(num_routed_layers=2))
    ms.eval()
    real, seen = ms.generate, []

    def generate(**kwargs):
        seen.append({i: g.forced for i, g in ms.gates.items()})
        if len(seen) == (1 if failing == "dense" else 2):
            raise RuntimeError("out of memory")
        return real(**kwargs)

    monkeypatch.setattr(ms, "generate", generate)
    with pytest.raises(RuntimeError, match="out of memory"):
        compare_generations(ms, _CharTokenizer(), "a prompt", max_new_tokens=2)
    assert set(seen[0].values()) == {True}  # the dense pass ran forced
    assert all(g.forced is None for g in ms.gates.values())
    with pytest.raises(ValueError), ms.forced({layer: True for layer in ms.routed_layers}):
        raise ValueError("inside the block")
    assert all(g.forced is None for g in ms.gates.values())


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("gran", GRANS)
def test_keep_all_equals_base_and_unload_restores(arch, gran):
    model = tiny_model(arch)
    ids, mask = padded_batch([9, 6, 4])
    ref = logits(model, ids, mask)
    modules_before = [(n, m) for n, m in model.named_modules()]
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=3, granularity=gran))
    ms.eval()
    ms.force(True)
    torch.testing.assert_close(logits(model, ids, mask), ref, atol=1e-5, rtol=0)
    ms.force(None)  # zero-initialised routers: r = 0.5 = threshold -> keep everything
    torch.testing.assert_close(logits(model, ids, mask), ref, atol=1e-5, rtol=0)
    assert ms.capacities() == {i: 1.0 for i in ms.routed_layers}
    base = ms.unload()
    assert base is model
    assert [(n, m) for n, m in base.named_modules()] == modules_before
    assert all(torch.equal(state_before[k], v) for k, v in base.state_dict().items())
    assert set(base.state_dict()) == set(state_before)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("gran", GRANS)
def test_token_routing_keep_all_equals_base(arch, gran):
    model = tiny_model(arch)
    ids, _ = padded_batch([9, 9])
    ref = logits(model, ids)
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=3, granularity=gran, route_level="token"))
    ms.eval()
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("gran", GRANS)
def test_forced_skip_equals_removed_sublayer(arch, gran):
    model = tiny_model(arch)
    ids, mask = padded_batch([8, 5])
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=3, granularity=gran))
    ms.eval()
    ms.force({3: False, 4: False})
    out = logits(model, ids, mask)
    assert ms.capacities() == {2: 1.0, 3: 0.0, 4: 0.0}
    ms.unload()
    removed = drop_sublayers(model, [3, 4], granularity=gran)
    ref = logits(model, ids, mask)
    removed.restore()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ref, logits(model, ids, mask), atol=1e-3)  # the removal mattered


def skip_and_mask_outputs(arch, level, gran):
    """Logits of one padded batch in skip mode and in mask mode (compute everything, then
    mask), under the first router seed that mixes decisions inside the batch; the decisions
    of both passes are checked equal. Returns (skip logits, mask logits) at real positions."""
    model = tiny_model(arch)
    ids, mask = padded_batch([8, 5, 7])
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3, 4], granularity=gran, route_level=level))
    ms.eval()
    for seed in range(10):
        random_routers(ms, seed=seed)
        out_skip = logits(model, ids, mask)
        keep = {i: d.clone() for i, d in ms.decisions().items()}
        if any(0 < int(d.sum()) < d.numel() for d in keep.values()):
            break
    assert any(0 < int(d.sum()) < d.numel() for d in keep.values()), "want mixed decisions"
    ms.set_execution("mask")
    out_mask = logits(model, ids, mask)
    assert all(torch.equal(keep[i], d) for i, d in ms.decisions().items())
    real = mask.bool()
    return out_skip[real], out_mask[real]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("level", ["seq", "token"])
@pytest.mark.parametrize("gran", GRANS)
def test_mask_mode_equals_skip_mode_with_mixed_decisions(arch, level, gran):
    """Computing only the kept rows/tokens gives what compute-everything-then-mask gives."""
    out_skip, out_mask = skip_and_mask_outputs(arch, level, gran)
    torch.testing.assert_close(out_skip, out_mask, atol=1e-5, rtol=0)


@pytest.mark.parametrize("level", ["seq", "token"])
@pytest.mark.parametrize("gran", GRANS)
def test_bf16_autocast_on_a_float32_model_with_mixed_decisions(level, gran):
    """Under bf16 autocast (``precision="bf16"`` on a float32 backbone) the kept rows/tokens
    come back from the sublayer in bf16 into a float32 residual stream: skip mode must accept
    them and agree with compute-then-mask under the same autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_skip, out_mask = skip_and_mask_outputs("llama", level, gran)
    torch.testing.assert_close(out_skip.float(), out_mask.float(), atol=2e-2, rtol=0)


def test_token_routing_attention_equals_a_loop_over_kept_prefixes():
    """Independent reference for token routing: the output of a kept token t is the plain
    attention module run on the kept tokens up to t (a skipped token is no key), read at t;
    a skipped token's output is zero."""
    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[3], route_level="token"))
    ms.eval()
    random_routers(ms, seed=4)
    gate = ms.gates[3]
    seen = {}

    def capture(module, args, kwargs, output):
        seen.update(x=kwargs.get("hidden_states", args[0] if args else None), kw=kwargs, out=output[0])

    handle = gate.register_forward_hook(capture, with_kwargs=True)
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    logits(model, ids)
    handle.remove()
    keep = ms.decisions()[3][0]
    assert 0 < int(keep.sum()) < keep.numel()
    cos, sin = seen["kw"]["position_embeddings"]
    for t in range(ids.shape[1]):
        if not keep[t]:
            assert torch.count_nonzero(seen["out"][0, t]) == 0
            continue
        prefix = [j for j in range(t + 1) if keep[j]]
        with torch.no_grad():
            ref, _ = gate.base_layer(seen["x"][:, prefix], position_embeddings=(cos[:, prefix], sin[:, prefix]),
                                     attention_mask=None)
        torch.testing.assert_close(seen["out"][0, t], ref[0, -1], atol=1e-5, rtol=0)


def test_token_routing_without_a_mask_where_causal_is_the_same_equals_the_masked_path():
    """Batch 1 under SDPA: every stored key is valid, so the gate hands the attention no mask
    (its own causal path) at prefill and at each decode step; the result equals the same
    routing with an explicit key mask (eager attention builds one at every call)."""
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    outs, masks = {}, {}
    for impl in ("sdpa", "eager"):
        model = tiny_model("llama", attn_implementation=impl)
        ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3], route_level="token"))
        ms.eval()
        random_routers(ms, seed=4)
        seen = masks.setdefault(impl, [])
        hook = ms.gates[3].base_layer.register_forward_pre_hook(
            lambda mod, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = [forward_step(model, ids[:, :8], cache, 0, logits_to_keep=0).logits]
            out += [forward_step(model, ids[:, t:t + 1], cache, t, logits_to_keep=0).logits for t in range(8, 12)]
        hook.remove()
        outs[impl] = torch.cat(out, 1)
        assert 0 < ms.skip_ratio() < 1  # some tokens skipped the routed attention, some ran it
    assert masks["sdpa"] and all(m is None for m in masks["sdpa"])
    assert masks["eager"] and all(m is not None for m in masks["eager"])
    torch.testing.assert_close(outs["sdpa"], outs["eager"], atol=1e-5, rtol=0)


def test_last_position_logits_never_copy_the_frozen_output_projection():
    """``logits_to_keep=1`` hands the output projection a (B, 1, d) slice; with the frozen
    weights MindSkip sets, plain matmul would copy the whole weight into a batched product at
    every prefill. The MindSkip model keeps it a single matrix product, with the same logits,
    and unload() takes the hook away."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model("llama")
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits[:, -1:]

    def bmm_calls():
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            out = model(input_ids=ids, logits_to_keep=1).logits
        return sum(e.count for e in prof.key_averages() if e.key == "aten::bmm"), out

    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3]))
    ms.eval()
    ms.force(True)
    calls, out = bmm_calls()
    assert calls == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    ms.unload()
    for p in model.parameters():
        p.requires_grad_(False)  # frozen, without MindSkip: the copying path the hook avoids
    calls, out = bmm_calls()
    assert calls > 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("level", ["seq", "token"])
def test_batch_invariance(side, level):
    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=4, route_level=level, routed_layers=[1, 2, 3, 4]))
    ms.eval()
    random_routers(ms, seed=3)
    ids, mask = padded_batch([10, 4, 7], side=side, seed=1)
    assert_batch_invariant(model, ms, ids, mask, level)
    assert 0.0 < ms.skip_ratio() < 1.0  # decisions really were mixed


# ---------------------------------------------------------------------------- cache consistency


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen3"])
@pytest.mark.parametrize("level", ["seq", "token"])
@pytest.mark.parametrize("gran", GRANS)
def test_cached_generate_equals_uncached_recomputation(arch, level, gran):
    model = tiny_model(arch)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3, 4], route_level=level, granularity=gran))
    ms.eval()
    random_routers(ms, seed=5)
    ids, mask = padded_batch([9, 5, 7], seed=2)
    steps = 6
    out = ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                      output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    if level == "seq":
        prefill = {i: d.clone() for i, d in ms.decisions().items()}
        assert any(0 < int(d.sum()) < d.numel() for d in prefill.values()), "want mixed decisions in the batch"
        ms.force(prefill)  # replay the prefill decisions in the uncached run
    ref_ids, ref_logits = greedy_uncached(model, ids, mask, steps)
    assert torch.equal(out.sequences, ref_ids)
    torch.testing.assert_close(torch.stack(out.scores, 1), ref_logits, atol=1e-4, rtol=0)
    assert 0.0 < ms.skip_ratio() < 1.0


def test_sampling_generate_runs_with_mixed_rows_and_saves_kv():
    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3, 4]))
    ms.eval()
    ms.force({2: torch.tensor([True, False]), 3: False})
    ids, mask = padded_batch([6, 4])
    cache = DynamicCache(config=model.config)
    torch.manual_seed(0)
    out = ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=10,
                      cache=cache, pad_token_id=0)
    assert out.shape == (2, 6 + 5)
    full = cache.layers[1].keys
    assert cache.layers[2].keys.shape[0] == 1  # only the kept row stored keys
    assert cache.layers[2].keys.shape[-2] == full.shape[-2]
    assert cache.layers[3].keys is None  # skipped by everyone: nothing stored
    assert cache.layers[4].keys.shape == full.shape


def test_decode_with_foreign_cache_is_refused():
    model = tiny_model("llama")
    ids, mask = padded_batch([5, 5])
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).cache
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3]))
    ms.eval()
    with pytest.raises(RuntimeError, match="not prefilled by this MindSkip model"):
        model(input_ids=ids[:, :1], attention_mask=torch.ones(2, 6, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("level", ["seq", "token"])
@pytest.mark.parametrize("gran", GRANS)
def test_straight_through_gradients_reach_routers_only(level, gran):
    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=3, granularity=gran, route_level=level,
                                                  reg_lambda=0.1, capacity_target=0.25))
    ms.train()
    ids, mask = padded_batch([8, 6])
    out = ms(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    loss = out.loss + ms.regularizer()
    loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("mindskip_router" in n for n in trainable)
    assert len(trainable) == len(ms.routed_layers)
    for p in ms.router_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    caps = ms.batch_capacities()
    assert set(caps) == set(ms.routed_layers) and all(c.requires_grad for c in caps.values())
    # zero init: every layer executes, capacity 1 > target -> positive regulariser
    torch.testing.assert_close(ms.regularizer(), torch.tensor(0.1 * 3 * 0.75), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=3, threshold=0.55))
    random_routers(ms, seed=9)
    ms.save_pretrained(tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    meta = json.loads((tmp_path / "r" / CONFIG_NAME).read_text())
    assert meta["num_layers"] == 6 and meta["hidden_size"] == 32 and meta["transformers_version"]
    ids, mask = padded_batch([7, 4])
    ms.eval()
    before = logits(model, ids, mask)
    w = {i: r.weight.clone() for i, r in ms.routers().items()}
    ms.unload()
    ms2 = MindSkipModel.from_pretrained(model, tmp_path / "r")
    ms2.eval()
    assert ms2.config.threshold == 0.55
    assert all(torch.equal(w[i], r.weight) for i, r in ms2.routers().items())
    torch.testing.assert_close(logits(model, ids, mask), before, atol=0, rtol=0)


def _saved(tmp_path, **cfg):
    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=3, **cfg))
    ms.save_pretrained(tmp_path / "r")
    ms.unload()
    return model, tmp_path / "r"


def test_load_onto_wrong_model_fails(tmp_path):
    _, path = _saved(tmp_path)
    other = tiny_model("llama", hidden_size=48)
    with pytest.raises(ValueError, match="does not fit this model.*hidden size"):
        MindSkipModel.from_pretrained(other, path)
    deeper = tiny_model("llama", num_hidden_layers=8)
    with pytest.raises(ValueError, match="layers"):
        MindSkipModel.from_pretrained(deeper, path)


def _rewrite_weights(path, data):
    """Replace the weights file and record its digest, as a consistent (but wrong) checkpoint."""
    import hashlib

    from safetensors.torch import save_file

    from rt_lib.mindskip.checkpoint import config_digest

    if isinstance(data, bytes):
        (path / WEIGHTS_NAME).write_bytes(data)
    else:
        save_file(data, str(path / WEIGHTS_NAME))
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["weights_sha256"] = hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()
    meta["config_sha256"] = config_digest(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def test_load_missing_extra_and_misshapen_keys_fail(tmp_path):
    from safetensors.torch import load_file

    model, path = _saved(tmp_path)
    w = load_file(str(path / WEIGHTS_NAME))
    _rewrite_weights(path, {k: v for k, v in w.items() if "layers.2." not in k})
    with pytest.raises(ValueError, match="missing keys"):
        MindSkipModel.from_pretrained(model, path)
    _rewrite_weights(path, {**w, "layers.9.router.weight": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match="unexpected keys"):
        MindSkipModel.from_pretrained(model, path)
    _rewrite_weights(path, {**w, "layers.2.router.weight": torch.zeros(1, 16)})
    with pytest.raises(ValueError, match="shape"):
        MindSkipModel.from_pretrained(model, path)
    # a failed load leaves the model untouched
    assert not any("mindskip" in n for n, _ in model.named_parameters())


def test_load_refuses_weights_that_do_not_match_the_recorded_digest(tmp_path, caplog):
    """A routers file swapped for another with the same keys and shapes must not load silently."""
    model, path = _saved(tmp_path)
    other = tiny_model("llama")
    ms = get_mindskip_model(other, MindSkipConfig(num_routed_layers=3))
    random_routers(ms, seed=1)
    ms.save_pretrained(tmp_path / "other")
    (path / WEIGHTS_NAME).write_bytes((tmp_path / "other" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match=f"{WEIGHTS_NAME} does not match its checkpoint.*re-save"):
        MindSkipModel.from_pretrained(model, path)
    assert not any("mindskip" in n for n, _ in model.named_parameters())
    # a checkpoint written before digests were recorded loads, with a warning
    meta = json.loads((path / CONFIG_NAME).read_text())
    del meta["weights_sha256"], meta["config_sha256"]
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    MindSkipModel.from_pretrained(model, path).unload()
    assert "loaded unverified" in caplog.text


def test_load_non_checkpoints_fail(tmp_path):
    model, path = _saved(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a router checkpoint"):
        MindSkipModel.from_pretrained(model, tmp_path / "nowhere")
    _rewrite_weights(path, b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        MindSkipModel.from_pretrained(model, path)
    (path / CONFIG_NAME).write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match="not an rt-kit router checkpoint"):
        MindSkipModel.from_pretrained(model, path)
    (path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MindSkipModel.from_pretrained(model, path)


# ---------------------------------------------------------------------------- bad models
def test_unsupported_architecture_names_what_is_missing():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Identity()
            self.mlp = nn.Identity()

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(4)])

    class Foreign(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

    with pytest.raises(ValueError, match="input_layernorm"):
        get_mindskip_model(Foreign(), MindSkipConfig(num_routed_layers=1))
    with pytest.raises(ValueError, match="no `model.layers`"):
        get_mindskip_model(nn.Linear(2, 2), MindSkipConfig())


def test_cache_reference_layers_cannot_be_routed():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="cache length"):
        get_mindskip_model(model, MindSkipConfig(routed_layers=[0, 3]))
    get_mindskip_model(model, MindSkipConfig(routed_layers=[0, 3], granularity="mlp")).unload()


def test_double_attach_refused():
    model = tiny_model("llama")
    get_mindskip_model(model, MindSkipConfig(num_routed_layers=2))
    with pytest.raises(ValueError, match="already has MindSkip routers"):
        get_mindskip_model(model, MindSkipConfig(num_routed_layers=2))


def test_one_token_prompt_takes_the_prefill_branch():
    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3]))
    ms.eval()
    ms.force({2: False})
    ids = torch.tensor([[5]])
    out = ms.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                      pad_token_id=0)
    assert out.shape == (1, 4)
    assert ms.capacities()[2] == 0.0 and ms.capacities()[3] == 1.0


def test_static_cache_mixed_rows_stays_correct():
    from transformers import StaticCache

    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3]))
    ms.eval()
    ms.force({2: torch.tensor([True, False]), 3: False})
    ids, mask = padded_batch([6, 4])
    dyn = ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    cache = StaticCache(config=model.config, max_cache_len=16)
    sta = ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                      cache=cache)
    assert torch.equal(dyn, sta)


def test_detached_runs_the_base_model_on_the_same_weights():
    model = tiny_model("llama")
    ids, mask = padded_batch([7, 5])
    ref = logits(model, ids, mask)
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=3, granularity="block"))
    ms.eval()
    ms.force(False)
    skipped = logits(model, ids, mask)
    with ms.detached() as base:
        assert base is model and not any("mindskip" in n for n, _ in base.named_parameters())
        torch.testing.assert_close(logits(base, ids, mask), ref, atol=0, rtol=0)
    torch.testing.assert_close(logits(model, ids, mask), skipped, atol=0, rtol=0)


# ---------------------------------------------------------------------------- sliding windows
SLIDING = {  # every supported architecture that has a sliding-window attention, window 8
    "mistral": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
    "qwen3": dict(use_sliding_window=True, sliding_window=8, max_window_layers=0),
    "gemma2": dict(sliding_window=8),
    "gemma3": dict(sliding_window=8),
    "phi3": dict(sliding_window=8),
}


def _max_generate_gap(ms, model, ids, mask, steps):
    # no end-of-sequence token: a finished row would be padded while the reference runs on
    out = ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                      output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    assert out.sequences.shape[1] == ids.shape[1] + steps
    ref_ids, ref_logits = greedy_uncached(model, ids, mask, steps)
    gap = float((torch.stack(out.scores, 1) - ref_logits).abs().max())
    return gap, torch.equal(out.sequences, ref_ids)


@pytest.mark.parametrize("arch", sorted(SLIDING))
@pytest.mark.parametrize("gran", ["attn", "block"])
def test_token_routing_with_sliding_window_cached_equals_uncached(arch, gran):
    """Rows keep different numbers of tokens; the sliding cache keeps only its newest slots,
    so a row's valid keys must be its newest slots (10 router seeds, prompts longer than the window)."""
    model = tiny_model(arch, **SLIDING[arch])
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3, 4], route_level="token", granularity=gran))
    ms.eval()
    ids, mask = padded_batch([20, 9, 14], seed=2)
    gaps = {}
    for seed in range(10):
        random_routers(ms, seed=seed)
        ms.reset_stats()
        gap, same_tokens = _max_generate_gap(ms, model, ids, mask, steps=6)
        assert 0.0 < ms.skip_ratio() < 1.0
        gaps[seed] = (gap, same_tokens)
    bad = {s: g for s, g in gaps.items() if g[0] > 1e-4 or not g[1]}
    assert not bad, f"cached != uncached for router seeds {bad}"


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_token_routing_keep_all_equals_base_with_sliding_window(arch):
    """The gate's own mask applies the model's window (Mistral and Phi3 set it in the config)."""
    model = tiny_model(arch, **SLIDING[arch])
    ids, mask = padded_batch([20, 9, 14], seed=2)
    ref = logits(model, ids, mask)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3, 4], route_level="token"))
    ms.eval()
    ms.force(True)
    real = mask.bool()
    torch.testing.assert_close(logits(model, ids, mask)[real], ref[real], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- beam search
def _beam(model_or_ms, ids, mask, steps=5, beams=3, **kw):
    return model_or_ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                num_beams=beams, do_sample=False, pad_token_id=0, length_penalty=0.0,
                                output_scores=True, return_dict_in_generate=True, **kw)


def test_beam_search_with_forced_keep_equals_the_unrouted_model():
    model = tiny_model("llama")
    ids, mask = padded_batch([9, 5, 7], seed=2)
    ref = _beam(model, ids, mask)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3, 4]))
    ms.eval()
    ms.force(True)
    out = _beam(ms.model, ids, mask)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gran", ["attn", "block"])
def test_beam_search_with_mixed_seq_decisions_equals_recomputation(gran):
    """Routed layers cache only the kept rows; beam reorders must pick the right ones."""
    model = tiny_model("llama")
    ids, mask = padded_batch([9, 5, 7], seed=2)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3, 4], granularity=gran))
    ms.eval()
    # generate expands each prompt to 3 beam rows (prompt-major); decisions here differ between
    # the beams of one prompt, so a reorder moves decisions and kept cache rows together
    per_prompt = {2: torch.tensor([True, False, True]), 3: torch.tensor([False, True, True])}
    per_row = {i: d.repeat(3) for i, d in per_prompt.items()}
    for decisions in (per_row, {i: d.repeat_interleave(3) for i, d in per_prompt.items()}):
        ms.force(decisions)
        ms.reset_stats()
        out = _beam(ms.model, ids, mask)  # through the model's own generate, as the docs say
        assert all(0 < ms.capacities()[i] < 1 for i in (2, 3))
        # reference: compute-then-mask keeps every row in every cache (the stock reorder applies)
        ms.set_execution("mask")
        ref = _beam(ms.model, ids, mask)
        ms.set_execution("skip")
        assert torch.equal(out.sequences, ref.sequences)
        torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=0)
    # decisions per prompt (what routers give): score each returned sequence from scratch, no cache
    ms.force(per_prompt)
    seqs = out.sequences
    full_mask = torch.cat([mask, torch.ones(3, seqs.shape[1] - ids.shape[1], dtype=torch.long)], 1)
    pos = (full_mask.cumsum(-1) - 1).clamp_min(0)
    lp = torch.log_softmax(logits(model, seqs, full_mask, position_ids=pos, use_cache=False), -1)
    new = seqs[:, ids.shape[1]:]
    summed = lp[:, ids.shape[1] - 1:-1].gather(-1, new.unsqueeze(-1)).squeeze(-1).sum(1)
    torch.testing.assert_close(out.sequences_scores, summed, atol=1e-4, rtol=0)


def test_beam_search_with_token_routing_equals_uncached_beam_search():
    """Token routing keeps a per-row key history beside the cache: it must follow the beams."""
    model = tiny_model("llama")
    ids, mask = padded_batch([9, 5, 7], seed=2)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3, 4], route_level="token"))
    ms.eval()
    random_routers(ms, seed=5)
    out = _beam(ms, ids, mask)
    assert 0.0 < ms.skip_ratio() < 1.0
    ref = _beam(ms, ids, mask, use_cache=False)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------- default layers
@pytest.mark.parametrize("arch, expected_left_out", [("gemma3", [5]), ("gemma2", [1])])
def test_default_layers_leave_out_cache_reference_layers(arch, expected_left_out, caplog, tmp_path):
    """Real layer patterns: Gemma-3 (18 layers) has full attention at 5, 11, 17; Gemma-2 alternates."""
    model = tiny_model(arch, num_hidden_layers=18)
    types = model.config.layer_types
    assert types.index("full_attention") == expected_left_out[0]
    for gran in ("attn", "block"):
        ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=16, granularity=gran))
        assert ms.routed_layers == [i for i in range(1, 17) if i not in expected_left_out]
        assert f"leave out {expected_left_out}" in caplog.text
        ms.unload()
    # mlp granularity never touches the cache: the full default range
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=16, granularity="mlp"))
    assert ms.routed_layers == list(range(1, 17))
    ms.unload()
    # naming such a layer explicitly stays an error
    with pytest.raises(ValueError, match=re.escape(f"layers {expected_left_out} cannot be routed")):
        get_mindskip_model(model, MindSkipConfig(routed_layers=[*expected_left_out, 8]))
    # the routers save and load with the same layer list
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=16))
    ids, mask = padded_batch([9, 5], seed=1)
    ms.eval()
    random_routers(ms, seed=2)
    before = logits(model, ids, mask)
    routed = ms.routed_layers
    ms.save_pretrained(tmp_path / "r")
    ms.unload()
    ms2 = MindSkipModel.from_pretrained(model, tmp_path / "r")
    ms2.eval()
    assert ms2.routed_layers == routed
    torch.testing.assert_close(logits(model, ids, mask), before, atol=0, rtol=0)

"""Batching under seq routing: per-request decisions, agreement metrics, grouping, and grouped
generation that returns exactly what each request gets alone."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny_models import padded_batch, random_routers, tiny_model

from rt_lib.speed import batching as bt
from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.mindskip.architecture import find_decoder
from rt_lib.mindskip.model import get_mindskip_model

LENGTHS = [9, 4, 7, 6, 3, 8, 5, 9]
GREEDY = dict(do_sample=False, pad_token_id=0)


def routed(arch="llama", granularity="attn", seed=3, **cfg):
    ms = get_mindskip_model(tiny_model(arch), MindSkipConfig(routed_layers=[1, 2, 3, 4], granularity=granularity, **cfg))
    ms.eval()
    random_routers(ms, seed=seed)
    return ms


def new_tokens_alone(ms, ids, mask, steps):
    """Each request generated on its own, without padding: its new tokens."""
    out = []
    for b in range(ids.shape[0]):
        real = mask[b].bool()
        seq = ms.generate(input_ids=ids[b:b + 1, real], attention_mask=mask[b:b + 1, real], max_new_tokens=steps,
                          **GREEDY)
        out.append(seq[0, int(real.sum()):])
    return out


# ---------------------------------------------------------------------------- decisions
def test_decisions_do_not_depend_on_the_rest_of_the_batch():
    ms = routed()
    ids, mask = padded_batch(LENGTHS, seed=1)
    keep = bt.decisions(ms, ids, mask)
    assert keep.dtype == torch.bool and keep.shape == (len(LENGTHS), 4)
    assert len({tuple(r) for r in keep.tolist()}) >= 4  # the rows really decide differently
    for b, n in enumerate(LENGTHS):  # alone, without padding
        assert torch.equal(bt.decisions(ms, ids[b:b + 1, -n:])[0], keep[b])
    perm = [5, 0, 7, 2, 6, 1, 4, 3]  # another order, with 5 more padding columns
    keep2 = bt.decisions(ms, F.pad(ids[perm], (5, 0)), F.pad(mask[perm], (5, 0)))
    assert torch.equal(keep2, keep[perm])
    assert torch.equal(bt.decisions(ms, ids[2:5], mask[2:5]), keep[2:5])
    # the decisions generate takes at prefill (and keeps for every step) are the same
    ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, **GREEDY)
    assert torch.equal(torch.stack([ms.decisions()[i].cpu() for i in ms.routed_layers], 1), keep)


def test_decisions_need_seq_routing_and_eval_mode():
    with pytest.raises(ValueError, match="seq routing"):
        bt.decisions(routed(route_level="token"), *padded_batch([4, 3]))
    ms = routed()
    ms.train()
    with pytest.raises(ValueError, match="training mode"):
        bt.decisions(ms, *padded_batch([4, 3]))


# ---------------------------------------------------------------------------- metrics
def test_agreement_metrics_on_hand_made_decisions():
    keep = torch.tensor([[1, 0, 0, 1],
                         [1, 0, 1, 1],
                         [1, 0, 0, 0]], dtype=torch.bool)
    assert bt.batch_agreement(keep) == 0.5  # layers 0 (all keep) and 1 (all skip)
    assert bt.batch_skip_ratio(keep) == 0.25  # only layer 1 is skipped by every row
    assert bt.row_skip_ratio(keep) == pytest.approx(6 / 12)  # rows skip 2, 1 and 3 of 4
    one = [[True, False, False, True]]  # a single row: the batch saves what the row saves
    assert (bt.batch_agreement(one), bt.batch_skip_ratio(one), bt.row_skip_ratio(one)) == (1.0, 0.5, 0.5)
    assert bt.batch_skip_ratio([False, False, True]) == pytest.approx(2 / 3)  # 1-D: one row
    same = torch.tensor([[0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    assert (bt.batch_agreement(same), bt.batch_skip_ratio(same)) == (1.0, pytest.approx(2 / 3))
    with pytest.raises(ValueError):
        bt.batch_agreement(torch.zeros(0, 3, dtype=torch.bool))


def test_group_rows_policies():
    a, b, c = [1, 0, 0], [0, 0, 1], [1, 1, 0]
    keep = torch.tensor([a, b, a, c, b, a], dtype=torch.bool)
    assert bt.group_rows(keep) == [[0, 2, 5], [1, 4], [3]]
    assert bt.group_rows(keep, "pattern", max_batch=2) == [[0, 2], [5], [1, 4], [3]]
    # cluster: full batches; seeds keep fewest layers, then rows that add fewest kept layers
    assert bt.group_rows(keep, "cluster", max_batch=2) == [[0, 2], [1, 4], [3, 5]]
    assert bt.group_rows(keep, "cluster") == [list(range(6))]
    g = torch.Generator().manual_seed(0)
    rand = torch.rand(37, 9, generator=g) < 0.4
    for policy in bt.POLICIES:
        for cap in (1, 4, 16):
            batches = bt.group_rows(rand, policy, cap)
            assert sorted(r for bt_ in batches for r in bt_) == list(range(37))
            assert all(0 < len(x) <= cap and x == sorted(x) for x in batches)
            if policy == "pattern":
                assert all(bt.batch_agreement(rand[x]) == 1.0 for x in batches)
            else:
                assert sum(len(x) < cap for x in batches) <= 1
    with pytest.raises(ValueError, match="unknown policy"):
        bt.group_rows(keep, "random")
    with pytest.raises(ValueError, match="max_batch"):
        bt.group_rows(keep, "pattern", 0)


# ---------------------------------------------------------------------------- generation
@pytest.mark.parametrize("policy,max_batch", [("pattern", None), ("pattern", 3), ("cluster", 3), ("cluster", None)])
def test_grouped_generation_equals_each_request_alone_and_plain_batching(policy, max_batch):
    ms = routed()
    ids, mask = padded_batch(LENGTHS, seed=1)
    steps = 6
    plain = ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, **GREEDY)
    out = bt.generate_grouped(ms, None, ids, mask, max_new_tokens=steps, policy=policy, max_batch=max_batch,
                              do_sample=False)
    assert torch.equal(out, plain)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    for b, alone in enumerate(new_tokens_alone(ms, ids, mask, steps)):
        assert torch.equal(out[b, ids.shape[1]:], alone), f"request {b}"
    assert len(bt.group_rows(bt.decisions(ms, ids, mask), policy, max_batch)) > 1 or max_batch is None


@pytest.mark.parametrize("arch,granularity", [("llama", "mlp"), ("llama", "block"), ("qwen3", "attn"),
                                              ("gemma3", "attn")])
def test_grouped_generation_other_granularities_and_sliding_windows(arch, granularity):
    """mlp/block reuse the prefill cache too; sliding-window caches cannot be cut, so the
    decisions are taken first and each batch is prefilled again with them forced."""
    ms = routed(arch, granularity)
    ids, mask = padded_batch([11, 4, 7, 6, 3, 10], seed=2)
    plain = ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, **GREEDY)
    out = bt.generate_grouped(ms, None, ids, mask, max_new_tokens=5, max_batch=2, do_sample=False, pad_token_id=0)
    assert bt._can_split_cache(ms) == (arch != "gemma3")
    assert torch.equal(out, plain)
    if arch == "llama":
        with_forced = bt.generate_grouped(ms, None, ids, mask, 5, policy="cluster", max_batch=2, reuse_prefill=False,
                                          do_sample=False)
        assert torch.equal(with_forced, plain)


def test_grouped_generation_prefills_once_and_pattern_batches_never_split_a_layer():
    ms = routed()
    ids, mask = padded_batch(LENGTHS, seed=1)
    seen = {"prefill": 0, "batch": 0, "decoding": False, "partial": 0, "calls": 0}

    def on_decoder(module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        seen.update(batch=x.shape[0], decoding=x.shape[1] == 1)
        seen["prefill"] += x.shape[1] > 1

    def on_sublayer(module, args, kwargs):  # decode steps: does a routed sublayer get all rows?
        x = kwargs.get("hidden_states", args[0] if args else None)
        if seen["decoding"]:
            seen["calls"] += 1
            seen["partial"] += x.shape[0] != seen["batch"]

    decoder, _ = find_decoder(ms.model)
    hooks = [decoder.register_forward_pre_hook(on_decoder, with_kwargs=True)]
    hooks += [g.base_layer.register_forward_pre_hook(on_sublayer, with_kwargs=True) for g in ms.gates.values()]
    try:
        bt.generate_grouped(ms, None, ids, mask, 4, policy="pattern", max_batch=3, do_sample=False, pad_token_id=0)
        assert seen["prefill"] == 3  # 8 requests in prefill chunks of 3; batches continue from them
        assert seen["partial"] == 0 and seen["calls"] > 0  # decode: a routed sublayer runs on all rows or none
        seen.update(prefill=0, partial=0)
        ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
        assert seen["prefill"] == 1 and seen["partial"] > 0  # plain batching: on the kept rows, at every step
    finally:
        for h in hooks:
            h.remove()


def test_generate_in_batches_equals_one_generate_call():
    ms = routed()
    ids, mask = padded_batch(LENGTHS, seed=1)
    plain = ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, **GREEDY)
    out = bt.generate_in_batches(ms, ids, mask, [[0, 1, 2], [3, 4, 5], [6, 7]], 5, 0, do_sample=False)
    assert torch.equal(out, plain)


def test_grouped_generation_refuses_what_it_cannot_honour():
    ms = routed()
    ids, mask = padded_batch([5, 3])
    for kw in (dict(num_beams=2), dict(num_return_sequences=2), dict(return_dict_in_generate=True), dict(max_length=9)):
        with pytest.raises(ValueError, match="unsupported generate arguments"):
            bt.generate_grouped(ms, None, ids, mask, 3, pad_token_id=0, **kw)
    with pytest.raises(ValueError, match="seq routing"):
        bt.generate_grouped(routed(route_level="token"), None, ids, mask, 3, pad_token_id=0)
    with pytest.raises(ValueError, match="reuse_prefill=True"):
        bt.generate_grouped(routed("gemma3"), None, ids, mask, 3, pad_token_id=0, reuse_prefill=True)


# ---------------------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_benchmark_smoke_writes_its_files(tmp_path):
    path = Path(__file__).parents[1] / "benchmarks" / "batching.py"
    spec = importlib.util.spec_from_file_location("batching_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out", str(tmp_path)]) == 0
    assert all((tmp_path / f"batching.{ext}").stat().st_size > 0 for ext in ("csv", "json", "png"))
    df = pd.read_csv(tmp_path / "batching.csv")
    assert sorted(df["batch_size"].unique()) == [1, 2, 4] and sorted(df["variant"].unique()) == ["dense", "mindskip", "uniform"]
    assert (df[df.variant == "dense"]["speedup"] == 1.0).all()
    mind = df[df.variant == "mindskip"].set_index("batch_size")
    uni = df[df.variant == "uniform"].set_index("batch_size")
    assert mind.loc[1, "batch_skip_ratio"] == mind.loc[1, "row_skip_ratio"] and mind.loc[1, "batch_agreement"] == 1.0
    assert (mind["batch_skip_ratio"] <= mind["row_skip_ratio"]).all()
    assert ((uni["row_skip_ratio"] - (mind["row_skip_ratio"] * 2).round() / 2).abs() < 1e-9).all()  # 2 routed layers
    assert (uni["batch_agreement"] == 1.0).all()
    gen = json.loads((tmp_path / "batching.json").read_text())["generation"]
    assert [r["plan"] for r in gen] == ["plain", "pattern", "cluster"]
    assert all(r["outputs_equal"] and r["rows_equal"] == r["requests"] for r in gen)

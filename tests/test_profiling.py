"""Profiler on tiny random Llama models built here: what it measures besides time.

No assertion depends on a timing: they check skip ratios, KV bytes, outputs, the handling of
grid points that do not fit, and the analytic bound against hand arithmetic.
"""

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rt_lib.speed import step as profile_step
from rt_lib.speed import profiling as P
from rt_lib.speed import timing as T
from rt_lib.speed import variants as V
from tests.tiny_models import decode_then_rewound_decode, prefill_and_decode_logits
from rt_lib.speed import roofline as R
from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.mindskip.architecture import get_slot

L = 6
ROUTED = [1, 2, 3, 4]  # num_routed_layers=4 on 6 layers: L-1-n .. L-2
SKIP = [2, 4]


def tiny_llama(seed=0):
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def ms():
    ms = V.prepare_models(tiny_llama(), config=MindSkipConfig(num_routed_layers=4))
    assert ms.routed_layers == ROUTED
    return ms


def untouched(ms):
    """Routers decide again and no sublayer is left removed or unwrapped."""
    layers = ms.model.model.layers
    return (all(g.forced is None and g.execution == "skip" for g in ms.gates.values())
            and all(get_slot(layers, i, ms.config.granularity) is g for i, g in ms.gates.items())
            and not any(type(m).__name__ == "_Removed" for m in ms.model.modules()))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One CPU thread per test, then the count the next test had: tiny models gain nothing from
    more, and threads spinning against other jobs on a busy machine slow them many times."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def settings(**kw):
    # fixed roofline peaks: no device measurement in tests
    return P.grid("smoke", **{"skip_layers": SKIP, "warmup": 0, "repeats": 2, "peak_flops": 1e12,
                              "bandwidth": 1e11, "threads": 1, **kw})


def by(rows, regime, variant, batch=None):
    out = [r for r in rows if r["regime"] == regime and r["variant"] == variant
           and (batch is None or r["batch_size"] == batch)]
    assert out, (regime, variant, batch)
    return out


# ---------------------------------------------------------------------------- analytic bound

def hand_config():
    # d=8, 2 heads of 4, 1 KV head, MLP 16, vocab 32, 4 layers
    return LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=4,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=4)


def test_step_costs_match_hand_arithmetic():
    shape = R.Shape.from_config(hand_config())
    assert (shape.num_layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (4, 8, 2, 1, 4)
    # prefill, batch 1, 2 tokens, 2-byte dtype; q_dim 8, kv_dim 4
    c = R.step_costs(shape, batch=1, new=2, past=0, dtype_bytes=2, head_tokens=1)
    # attn flops: projections 2*1*2*8*(2*8 + 2*4) = 768; scores+values 4*1*2*4*(0 + 2*3/2 = 3) = 96
    # attn bytes: 2 * (weights 8*24 + cache read 2*4*2 + cache write 2*4*2 + acts 2*(2*8 + 2*24)) = 2*352
    assert c["attn"] == (864, 704)
    # mlp: 2*1*2*8*16*3 = 1536 flops; 2 * (3*8*16 + 2*(2*8 + 2*3*16)) = 2*608 bytes
    assert c["mlp"] == (1536, 1216)
    # head on the last token only: 2*8*32 flops; 2 * (8*32 + 8 + 32) bytes
    assert c["head"] == (512, 592)
    # decode: 1 token on a context of 2 -> keys seen 2 + 1 = 3
    d = R.step_costs(shape, batch=1, new=1, past=2, dtype_bytes=2)
    # 2*1*1*8*24 + 4*2*4*3 = 480 flops; 2 * (192 + 2*4*3 + 2*4*1 + 1*(16 + 48)) = 576 bytes
    assert d["attn"] == (480, 576)


def test_bound_speedup_hand_checked():
    shape = R.Shape.from_config(hand_config())
    args = {"regime": "prefill", "batch": 1, "seq_len": 2, "dtype_bytes": 2}
    # compute-bound (1 flop/s, unlimited bandwidth): 4*864 + 4*1536 + 512 = 10112; minus 2*864
    assert R.bound_speedup(shape, removed=2, peak_flops=1, bandwidth=1e30, **args) == pytest.approx(10112 / 8384)
    # memory-bound: 4*704 + 4*1216 + 592 = 8272; minus 2*704
    assert R.bound_speedup(shape, removed=2, peak_flops=1e30, bandwidth=1, **args) == pytest.approx(8272 / 6864)
    # per-operation roofline at 1 flop/s and 1 byte/s: attn 864, mlp 1536, head 592 (memory)
    assert R.bound_speedup(shape, removed=2, peak_flops=1, bandwidth=1, **args) == pytest.approx(10192 / 8464)
    assert R.bound_speedup(shape, removed=0, peak_flops=1, bandwidth=1, **args) == 1.0
    # decode, 1 step on a context of 2, memory-bound: attn 576, mlp 2*(384 + 2*(8 + 48)) = 992,
    # head 2*(256 + 40) = 592: (4*576 + 4*992 + 592) / (2*576 + 4*992 + 592)
    got = R.bound_speedup(shape, "decode", 1, 2, 2, peak_flops=1e30, bandwidth=1, dtype_bytes=2, new_tokens=1)
    assert got == pytest.approx(6864 / 5712)
    # MLP sublayers removed instead (compute-bound prefill): 4*864 + 4*1536 + 512 minus 2*1536;
    # whole layers: minus 2*(864 + 1536)
    assert R.bound_speedup(shape, removed=2, peak_flops=1, bandwidth=1e30, granularity="mlp", **args) == \
        pytest.approx(10112 / 7040)
    assert R.bound_speedup(shape, removed=2, peak_flops=1, bandwidth=1e30, granularity="block", **args) == \
        pytest.approx(10112 / 5312)
    with pytest.raises(ValueError, match="granularity"):
        R.bound_speedup(shape, removed=1, peak_flops=1, bandwidth=1, granularity="head", **args)


def test_bound_curves_run_from_dense_to_every_routed_sublayer_removed():
    shape = R.Shape.from_config(hand_config())
    points = [("prefill", 1, 2), ("decode", 2, 3)]
    curves = R.bound_curves(shape, points, n_routed=3, peak_flops=1, bandwidth=1, dtype_bytes=2, new_tokens=4,
                            granularity="mlp")
    assert [(c["regime"], c["batch_size"], c["seq_len"]) for c in curves] == points
    for c, (regime, batch, seq_len) in zip(curves, points):
        assert c["skip_ratio"] == [0, 1 / 3, 2 / 3, 1]
        assert c["bound_speedup"][0] == 1.0
        assert c["bound_speedup"] == sorted(c["bound_speedup"])  # removing more never costs time
        # prefill is one forward; decode averages over new_tokens steps
        n = 4 if regime == "decode" else 1
        assert c["bound_speedup"][2] == R.bound_speedup(shape, regime, batch, seq_len, 2, 1, 1, 2, n, "mlp")


def test_point_memory_estimate_hand_checked():
    shape = R.Shape.from_config(hand_config())
    # decode, batch 2, context 3 + 1 new, 2-byte dtype: kv 2*4*2*1*4*4*2 = 512;
    # activations 2*3*(4*8 + 3*16 + 2*(2 + 2*1)*4)*2 = 1344; scores 2*2*3*4*2 = 96; logits 2*32*4 = 256
    assert R.estimate_point_bytes(shape, "decode", 2, 3, 1, 2) == 512 + 1344 + 96 + 256


# ---------------------------------------------------------------------------- protocol

def test_interleave_runs_variants_in_alternating_rounds():
    calls = []
    out = T.interleave(["a", "b", "c"], lambda n: calls.append(n) or {"n": n}, warmup=1, repeats=3)
    assert "".join(calls) == "abc" + "abc" + "cba" + "abc"
    assert {k: len(v) for k, v in out.items()} == {"a": 3, "b": 3, "c": 3}


def test_grid_points_prefill_first_and_filtered_by_regime():
    st = P.grid("smoke", prefill_batch_sizes=[1, 4], prefill_seq_lens=[8, 16], decode_batch_sizes=[2],
                decode_context_lens=[32])
    assert P.grid_points(st) == [("prefill", 1, 8), ("prefill", 1, 16), ("prefill", 4, 8), ("prefill", 4, 16),
                                 ("decode", 2, 32)]
    assert P.grid_points(replace(st, regimes=["decode"])) == [("decode", 2, 32)]


def test_untimed_prefill_threads_follow_the_settings_and_are_put_back(ms, monkeypatch):
    import os

    cpu, seen = torch.device("cpu"), []
    for threads, inside in ((None, len(os.sched_getaffinity(0))), (1, 1)):
        with T.untimed_threads(cpu, threads):
            assert torch.get_num_threads() == inside
        assert torch.get_num_threads() == 1  # the timing's count (the autouse fixture's) is back
    real = T.forward_step
    monkeypatch.setattr(T, "forward_step", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    T.measure_point(V.build_variants(ms, ["dense"], SKIP, None, None), "decode", 1, 4,
                    settings(new_tokens=1, repeats=1), cpu, vocab=96)
    assert P.grid("smoke").prefill_threads == 1 and set(seen) == {1}  # prefill and steps: one thread
    seen.clear()
    T.measure_point(V.build_variants(ms, ["dense"], SKIP, None, None), "decode", 1, 4,
                    settings(new_tokens=1, repeats=1, prefill_threads=2), cpu, vocab=96)
    assert seen[0] == 2 and set(seen[1:]) == {1}  # the one prefill (rewound afterwards), then the timed steps


def test_measure_point_returns_one_record_per_round(ms):
    variants = V.build_variants(ms, ["dense", "mindskip_forced"], SKIP)
    st = settings(warmup=1, repeats=3)
    out = T.measure_point(variants, "decode", 2, 5, st, torch.device("cpu"), vocab=96)
    assert set(out) == {"dense", "mindskip_forced"}
    for records in out.values():
        assert len(records) == 3
        for r in records:
            assert set(r) == {"time_ms", "skip_ratio", "skipped", "kv_bytes", "kv_bytes_prefill"}
            assert r["time_ms"] > 0
            # decode: the cache grows by the new tokens after the prefill
            assert r["kv_bytes"] * 5 == r["kv_bytes_prefill"] * (5 + st.new_tokens)
    assert [r["skip_ratio"] for r in out["mindskip_forced"]] == [len(SKIP) / len(ROUTED)] * 3
    assert all(r["skipped"] == {layer: 1.0 for layer in SKIP} for r in out["mindskip_forced"])
    assert all(r["skipped"] == {} for r in out["dense"])
    assert untouched(ms)


def test_rewound_decode_equals_a_fresh_prefill_after_another_variant_ran(ms):
    """Decode from a rewound cache, with the gates' decisions put back after another variant's
    prefill replaced them, gives the logits of a fresh prefill + decode."""
    ms.set_threshold(0.5)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for r in ms.routers().values():
            r.weight.copy_(torch.randn(r.weight.shape, generator=g))
    variants = {v.name: v for v in V.build_variants(ms, ["mindskip", "mindskip_forced"], SKIP)}
    ids = torch.randint(3, 96, (3, 9), generator=g)
    prompt, steps = ids[:, :6], ids[:, 6:]

    first, again, _ = decode_then_rewound_decode(ms, variants, prompt, steps)
    assert variants["mindskip"].rewindable
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    ms.set_threshold(0.5)
    with torch.no_grad():
        for r in ms.routers().values():
            r.weight.zero_()
    assert untouched(ms)


def test_measured_bound_adds_up_the_skipped_sublayers():
    sub = {(1, "attn"): 2.0, (2, "attn"): 3.0, (1, "mlp"): 4.0, (2, "mlp"): 1.0}
    assert T.measured_bound(10.0, sub, {1: 1.0, 2: 1.0}, "attn") == pytest.approx(10 / 5)
    assert T.measured_bound(10.0, sub, {1: 0.5}, "mlp") == pytest.approx(10 / 8)
    assert T.measured_bound(10.0, sub, {}, "attn") == 1.0


def test_sublayer_times_nest_inside_the_layer_and_the_forward(ms):
    dense = V.build_variants(ms, ["dense"], SKIP)[0]
    total, sub = T.sublayer_ms(dense, "decode", 2, 5, settings(), torch.device("cpu"), vocab=96)
    assert {k for k, _ in sub} == set(range(L)) and {kind for _, kind in sub} == {"attn", "mlp", "block"}
    for i in range(L):
        assert sub[(i, "attn")] + sub[(i, "mlp")] <= sub[(i, "block")]
    assert sum(sub[(i, "block")] for i in range(L)) <= total
    assert untouched(ms)


def test_kv_cache_bytes_counts_only_updated_layers():
    from transformers import DynamicCache

    m = tiny_llama()
    cache = DynamicCache(config=m.config)
    assert T.kv_cache_bytes(cache) == 0
    with torch.inference_mode():
        m(input_ids=torch.randint(3, 96, (2, 5)), cache=cache, use_cache=True)
    # 6 layers x keys+values x (batch 2, 2 KV heads, 5 tokens, head_dim 8) x 4 bytes
    assert T.kv_cache_bytes(cache) == L * 2 * (2 * 2 * 5 * 8) * 4


# ---------------------------------------------------------------------------- variants

@pytest.mark.slow
def test_realised_skip_ratio_equals_forced_decisions(ms):
    rows, cond = P.profile(ms, settings(variants=["dense", "mindskip_forced", "mask", "oracle", "mindskip"],
                                              threshold=0.75), progress=False)
    assert cond["skip_layers"] == SKIP
    for regime in R.REGIMES:
        for r in by(rows, regime, "mindskip_forced") + by(rows, regime, "mask"):
            assert r["skip_ratio"] == len(SKIP) / len(ROUTED)
        for r in by(rows, regime, "oracle"):
            assert r["skip_ratio"] == len(SKIP) / len(ROUTED)
        # zero-init routers score 0.5 < 0.75: every routed sublayer skipped
        for r in by(rows, regime, "mindskip"):
            assert r["skip_ratio"] == 1.0
        for r in by(rows, regime, "dense"):
            assert r["skip_ratio"] == 0.0 and r["speedup"] == 1.0
    assert all(r["status"] == "ok" for r in rows)
    assert untouched(ms)


@pytest.mark.slow
def test_kv_memory_of_skipped_layers_is_saved(ms):
    rows, _ = P.profile(ms, settings(variants=["dense", "mindskip_forced", "oracle", "mask"]), progress=False)
    k = len(SKIP)
    for regime in R.REGIMES:
        for dense in by(rows, regime, "dense"):
            b = dense["batch_size"]
            assert dense["kv_bytes"] > 0
            for name in ("mindskip_forced", "oracle"):
                assert by(rows, regime, name, b)[0]["kv_bytes"] * L == dense["kv_bytes"] * (L - k)
            assert by(rows, regime, "mask", b)[0]["kv_bytes"] == dense["kv_bytes"]  # computes and stores all


@pytest.mark.parametrize("granularity", ["attn", "mlp", "block"])
def test_oracle_and_forced_skip_give_identical_logits(granularity):
    reference = tiny_llama()  # the same weights, never wrapped
    ms = V.prepare_models(tiny_llama(), config=MindSkipConfig(num_routed_layers=4, granularity=granularity))
    variants = {v.name: v for v in V.build_variants(ms, ["mindskip_forced", "oracle", "mask", "dense"], SKIP)}
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    steps = torch.randint(3, 96, (2, 3), generator=torch.Generator().manual_seed(2))

    def run(v):
        return prefill_and_decode_logits(v, ids, steps)

    forced, oracle = run(variants["mindskip_forced"]), run(variants["oracle"])
    assert torch.equal(forced, oracle)
    torch.testing.assert_close(run(variants["mask"]), oracle)
    dense = run(variants["dense"])
    assert torch.equal(dense, run(V.Variant("reference", reference, lambda: None, lambda: None, lambda: 0.0)))
    assert not torch.allclose(dense, oracle)  # the skip did change something
    assert untouched(ms)


@pytest.mark.slow
def test_rows_summarise_the_recorded_rounds(ms):
    rows, cond = P.profile(ms, settings(variants=["dense", "oracle"], repeats=4), progress=False)
    raw = {(m["regime"], m["batch_size"], m["variant"]): m["times_ms"] for m in cond["measurements"]}
    for r in rows:
        times = sorted(raw[(r["regime"], r["batch_size"], r["variant"])])
        assert len(times) == 4
        # linear interpolation between closest ranks: positions 0.3, 1.5 and 2.7 of 4 sorted times
        assert r["p10_ms"] == pytest.approx(times[0] + 0.3 * (times[1] - times[0]))
        assert r["median_ms"] == pytest.approx((times[1] + times[2]) / 2)
        assert r["p90_ms"] == pytest.approx(times[2] + 0.7 * (times[3] - times[2]))
        dense = next(d for d in rows if d["variant"] == "dense" and d["regime"] == r["regime"]
                     and d["batch_size"] == r["batch_size"])
        assert r["speedup"] == pytest.approx(dense["median_ms"] / r["median_ms"])
    # the oracle's roofline estimate is the curve's value at its number of removed sublayers; its
    # measured bound adds up the dense model's hooked time of exactly the removed sublayers
    for r in by(rows, "prefill", "oracle") + by(rows, "decode", "oracle"):
        curve = next(c for c in cond["bound_curves"] if (c["regime"], c["batch_size"], c["seq_len"]) ==
                     (r["regime"], r["batch_size"], r["seq_len"]))
        assert r["roofline_speedup"] == pytest.approx(curve["bound_speedup"][len(SKIP)])
        sub = next(t for t in cond["sublayer_times"] if (t["regime"], t["batch_size"], t["seq_len"]) ==
                   (r["regime"], r["batch_size"], r["seq_len"]))
        saved = sum(sub["sublayer_ms"][f"{layer}.attn"] for layer in SKIP)
        assert r["bound_speedup"] == pytest.approx(sub["dense_hooked_ms"] / (sub["dense_hooked_ms"] - saved))
        assert r["bound_speedup"] > 1.0


def test_static_drop_removes_attention_whatever_the_routers_gate():
    ms = V.prepare_models(tiny_llama(), config=MindSkipConfig(num_routed_layers=4, granularity="mlp"))
    rows, _ = P.profile(ms, settings(variants=["dense", "oracle", "static_drop"], static_layers=[1, 3],
                                     regimes=["prefill"]), progress=False)
    for dense in by(rows, "prefill", "dense"):
        b = dense["batch_size"]
        # MLP sublayers removed: every layer still stores keys and values
        assert by(rows, "prefill", "oracle", b)[0]["kv_bytes"] == dense["kv_bytes"]
        # attention removed from 2 of 6 layers: their keys and values are never stored
        assert by(rows, "prefill", "static_drop", b)[0]["kv_bytes"] * L == dense["kv_bytes"] * (L - 2)
    assert untouched(ms)


def test_skip_layers_chosen_from_router_decisions(ms):
    with torch.no_grad():
        for r in ms.routers().values():
            r.weight.fill_(0.0)
        ms.set_threshold(0.5)
    ids = torch.randint(3, 96, (2, 6))
    # ties (all kept): the deepest k
    assert V.choose_skip_layers(ms, ids, 2) == [3, 4]
    ms.set_threshold(0.75)  # every layer skipped for every sequence
    assert V.choose_skip_layers(ms, ids, None) == ROUTED


def test_unrouted_skip_layers_rejected(ms):
    with pytest.raises(ValueError, match="not routed"):
        V.build_variants(ms, ["oracle"], [5])


# ---------------------------------------------------------------------------- bad input

@pytest.mark.slow
def test_out_of_memory_point_is_skipped_and_the_rest_continues():
    model = tiny_llama()

    def oom_at_batch_2(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[0] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (simulated)")

    model.model.register_forward_pre_hook(oom_at_batch_2, with_kwargs=True)
    ms = V.prepare_models(model, config=MindSkipConfig(num_routed_layers=4))
    rows, _ = P.profile(ms, settings(variants=["dense", "mindskip_forced", "oracle"]), progress=False)
    assert len(rows) == 2 * 2 * 3  # regimes x batch sizes x variants: skipped points keep their rows
    for r in rows:
        if r["batch_size"] == 2:
            assert r["status"] == "skipped" and "out of memory" in r["reason"] and "simulated" in r["reason"]
            assert pd.isna(r["median_ms"])
        else:
            assert r["status"] == "ok" and r["median_ms"] > 0 and r["reason"] == ""
    # the failure happened inside a variant: its state was undone
    assert untouched(ms)


def test_other_runtime_errors_are_not_swallowed(ms):

    def boom(module, args, kwargs):
        raise RuntimeError("shape mismatch")

    ms.model.model.register_forward_pre_hook(boom, with_kwargs=True)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        P.profile(ms, settings(variants=["dense"]), progress=False)


def test_point_larger_than_memory_is_skipped_by_estimate(ms, monkeypatch):
    shape = R.Shape.from_config(ms.model.config)
    small = R.estimate_point_bytes(shape, "prefill", 1, 8, 0, 4)
    big = R.estimate_point_bytes(shape, "prefill", 2, 8, 0, 4)
    assert big > small
    monkeypatch.setattr(P, "available_memory", lambda device: int((small + big) / 2 / 0.9))
    rows, _ = P.profile(ms, settings(variants=["dense", "oracle"], regimes=["prefill"]), progress=False)
    status = {(r["batch_size"], r["variant"]): (r["status"], r["reason"]) for r in rows}
    assert status[(1, "dense")] == ("ok", "")
    assert status[(2, "dense")][0] == "skipped" and status[(2, "dense")][1].startswith("estimated")


# ---------------------------------------------------------------------------- results files

@pytest.mark.slow
def test_results_files_follow_the_format(ms, tmp_path):
    from rt_lib.runs.record import new_run

    rows, cond = P.profile(ms, settings(variants=["dense", "mindskip_forced", "oracle", "mask"]),
                           progress=False)
    run = new_run(root=tmp_path, run_id="r1", preset="smoke")
    prof = profile_step.write_results(rows, cond, run)
    df = pd.read_csv(f"{prof}/profile.csv")
    assert list(df.columns) == P.COLUMNS
    assert set(df.regime) == {"prefill", "decode"}
    assert (df[df.regime == "prefill"].new_tokens == 0).all() and (df[df.regime == "decode"].new_tokens == 3).all()
    meta = json.loads((prof / "profile.json").read_text())
    for key in ("device", "dtype", "threads", "repeats", "warmup", "versions", "skip_layers", "roofline"):
        assert key in meta, key
    assert meta["threads"] == torch.get_num_threads()
    assert {"torch", "transformers"} <= set(meta["versions"])
    assert (prof / "speedup_vs_skip.png").stat().st_size > 0
    s = P.summarize(rows)
    assert list(s.regime) == ["prefill", "prefill", "decode", "decode"]
    assert s["kv_saving"].tolist() == pytest.approx([len(SKIP) / L] * 4)
    assert (s["skip_ratio_forced"] == 0.5).all()


@pytest.mark.slow
def test_run_step_records_the_step_and_returns_the_model_as_it_came(tmp_path):
    """The profiling step of a run: profile/ written, its options in parameters.profile, what it
    measured with in steps.profile, and the model unwrapped again (same modules, same logits)."""
    model = tiny_llama()
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    kinds = [type(m).__name__ for m in model.modules()]
    routers = tmp_path / "routers"
    V.prepare_models(tiny_llama(), config=MindSkipConfig(num_routed_layers=4)).save_pretrained(routers)

    rows, cond, prof = profile_step.run_step(model, None, tmp_path / "run", settings(variants=["dense", "mindskip"]),
                                             routers=str(routers), text=None, grid_name="smoke",
                                             model_name="tiny", progress=False)
    assert prof == tmp_path / "run" / "profile" and (prof / "profile.csv").is_file()
    assert {r["variant"] for r in rows} == {"dense", "mindskip"}
    assert cond["grid"] == "smoke" and "preset" not in cond and cond["model"] == "tiny" and cond["text"] is None
    assert cond["routers"]["path"] == str(routers) and len(cond["routers"]["weights_sha256"]) == 64
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    params = meta["parameters"]["profile"]
    assert (params["grid"], params["model"], params["threads"], params["skip_layers"]) == ("smoke", "tiny", 1, SKIP)
    assert meta["preset"] is None  # run.json `preset` is the pipeline preset; this run was made outside it
    assert meta["steps"]["profile"]["routers"] == cond["routers"]
    assert meta["steps"]["profile"]["skip_layers"] == SKIP
    assert [type(m).__name__ for m in model.modules()] == kinds
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_prompts_are_windows_of_the_given_text():
    text = torch.arange(100, 130)
    ids = T.grid_tokens(2, 10, vocab=96, tokens=text)
    assert ids.tolist() == [list(range(100, 110)), list(range(110, 120))]
    wrapped = T.grid_tokens(4, 10, vocab=96, tokens=text)  # 40 tokens from 30: rows wrap around
    assert wrapped.shape == (4, 10) and set(wrapped.flatten().tolist()) <= set(text.tolist())
    rnd = T.grid_tokens(2, 10, vocab=96, seed=3)
    assert torch.equal(rnd, T.grid_tokens(2, 10, vocab=96, seed=3)) and int(rnd.max()) < 96


def test_grid_lookup_names_the_grids():
    assert P.grid("quick", repeats=2).repeats == 2 and P.grid("quick").repeats == P.PROFILE_GRIDS["quick"].repeats
    with pytest.raises(ValueError, match="unknown profile grid 'huge'; grids: smoke, quick, full"):
        P.grid("huge")


def test_cli_grid_flag_and_its_deprecated_spelling(monkeypatch, capsys):
    """``--grid``; the old ``--preset`` still works with a one-line note (both checked against the grids)."""
    from rt_lib.cli.profile import main

    seen = []

    def stop(name, **kw):
        seen.append(name)
        raise KeyboardInterrupt  # stop before any model is loaded

    monkeypatch.setattr(P, "grid", stop)
    for argv, note in ((["--grid", "full"], ""), (["--preset", "smoke"], "note: --preset is deprecated, use --grid\n")):
        with pytest.raises(KeyboardInterrupt):
            main([*argv, "--out", "unused"])
        assert capsys.readouterr().err == note
    assert seen == ["full", "smoke"]
    for argv in (["--grid", "huge"], ["--preset", "huge"]):
        with pytest.raises(SystemExit):
            main([*argv, "--out", "unused"])
        assert "invalid choice: 'huge'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_writes_a_run_on_the_embedded_tiny_model(tmp_path, capsys):
    from rt_lib.cli.profile import main

    out = tmp_path / "runs" / "p1"
    assert main(["--grid", "smoke", "--model", "tiny-random-llama", "--num-routed-layers", "2",
                 "--static-layers", "3", "--out", str(out), "--text", "none", "--repeats", "1", "--threads", "1",
                 "--no-progress"]) == 0
    df = pd.read_csv(out / "profile" / "profile.csv")
    assert list(df.columns) == P.COLUMNS and (df.status == "ok").all()
    assert set(df.variant) == set(V.VARIANTS)
    run = json.loads((out / "run.json").read_text())
    assert run["steps"]["profile"]["skip_layers"] == [1, 2]
    assert "forced/oracle" in capsys.readouterr().out

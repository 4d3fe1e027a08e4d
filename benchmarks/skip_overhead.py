"""Where MindSkip's forced skip spends time that the physically removed sublayer does not.

Not a test. On the embedded model with every routed sublayer (attention, the default
granularity) force-skipped:
1. torch.profiler attribution: aten ops issued under each function of the kit's routing code
   (every rt_lib module except the profiler that drives the model) per forward (prefill
   1 x seq_len, and one decode step), with their CPU time;
2. one gate called in isolation with the arguments and routing context it gets in the model,
   against the stand-in that `drop_sublayers` puts in place of a removed sublayer (us per call);
3. with --what-if: one interleaved profiler run of dense, oracle, static_drop of the same
   layers (identical code to the oracle: the noise floor), the forced skip, and the forced skip
   with its skipped gates replaced by the removed-sublayer stand-in (`drop_sublayers` on the
   MindSkip model): forced minus that is what the gates cost, that minus the oracle is what
   MindSkip's per-forward routing work costs.

    python benchmarks/skip_overhead.py [--what-if --repeats 20]
"""

import argparse
import collections
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from rt_lib.speed import profiling as P
from rt_lib.speed import roofline as R
from rt_lib.speed import timing as T
from rt_lib.speed import variants as V
from rt_lib.assets.loading import load_model
from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.mindskip.architecture import find_decoder, get_slot

# frames of the code that drives the model, not of the routing code being attributed
from rt_lib.mindskip.removal import drop_sublayers

# frames of the code that drives the model, not of the routing code being attributed
DRIVER_FRAMES = ("rt_lib/speed/profiling.py(", "rt_lib/speed/timing.py(")


def routing_frame(event):
    """(innermost rt_lib routing-code frame above an aten op or None, whether the op is top-level)."""
    par, top, owner = event.cpu_parent, True, None
    while par is not None:
        top = top and not par.name.startswith("aten::")
        if owner is None and "rt_lib/" in par.name and not any(d in par.name for d in DRIVER_FRAMES):
            owner = par.name.split("rt_lib/")[-1]
        par = par.cpu_parent
    return owner, top


def attribution(model, prompt, step, seq_len):
    """aten ops (and their CPU us) under each routing-code function of rt_lib, per forward."""
    out = {}
    with torch.inference_mode():
        for phase in ("prefill", "decode"):
            cache = T.new_cache(model)
            T.forward_step(model, prompt, cache, 0)
            n = 1 if phase == "prefill" else 10
            with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
                if phase == "prefill":
                    T.forward_step(model, prompt, T.new_cache(model), 0)
                else:
                    for i in range(n):
                        T.forward_step(model, step, cache, seq_len + i)
            ops, us = collections.Counter(), collections.Counter()
            for e in prof.events():
                if not e.name.startswith("aten::"):
                    continue
                owner, top = routing_frame(e)
                if owner:
                    ops[owner] += 1
                    us[owner] += e.cpu_time_total if top else 0
            out[phase] = {k: (ops[k] / n, us[k] / n) for k in sorted(ops, key=lambda k: -us[k])}
    return out


def per_call_us(fn, calls):
    """Best of 5 timings of `calls` calls of `fn`, in us per call (after 50 warm-up calls)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def removed_stand_in(ms, layer):
    """The module `drop_sublayers` puts in place of the routed sublayer of `layer`."""
    with ms.detached():
        dropped = drop_sublayers(ms.model, [layer], ms.config.granularity)
        stand_in = get_slot(find_decoder(ms.model)[1], layer, ms.config.granularity)
        dropped.restore()
    return stand_in


def isolated_gate(ms, prompt, step, seq_len, calls=2000):
    """us per call of one forced-skip gate and of the removed-sublayer stand-in, same arguments."""
    layer = ms.routed_layers[len(ms.routed_layers) // 2]
    gate, stand_in = ms.gates[layer], removed_stand_in(ms, layer)
    with torch.inference_mode():
        cache = T.new_cache(ms.model)
        return {phase: time_gate_call(ms.model, gate, stand_in, ids, cache, start, calls)
                for phase, ids, start in (("prefill", prompt, 0), ("decode", step, seq_len))}


def time_gate_call(model, gate, stand_in, ids, cache, start, calls):
    """Run the model's forward of `ids` into `cache`, capturing the arguments `gate` gets; then
    (gate us per call, stand-in us per call, aten ops of one gate call) with those arguments."""
    seen = []
    hook = gate.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))), with_kwargs=True)
    T.forward_step(model, ids, cache, start)
    hook.remove()
    # called right after the model's forward: the routing context is as its decoder hook set
    # it for this call (cache, tokens already cached, real tokens)
    args, kw = seen[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        gate(*args, **kw)
    n_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    return (per_call_us(lambda: gate(*args, **kw), calls), per_call_us(lambda: stand_in(*args, **kw), calls), n_ops)


def what_if(ms, args):
    """Interleaved medians (ms; decode per token) of the profiler's variants and the forced skip
    with its skipped gates replaced by the removed-sublayer stand-in."""
    skip = list(ms.routed_layers)
    variants = V.build_variants(ms, ["dense", "oracle", "static_drop", "mindskip_forced"], skip, static_layers=skip)
    forced = variants[-1]
    dropped = []

    def enter():
        forced.enter()
        dropped.append(drop_sublayers(ms.model, skip, ms.config.granularity))

    def exit():
        dropped.pop().restore()
        forced.exit()
    variants.append(V.Variant("gates_removed", ms.model, enter, exit, lambda: 1.0))
    settings = P.ProfileSettings(repeats=args.repeats, warmup=2, new_tokens=args.new_tokens)
    res = {}
    for regime in R.REGIMES:
        r = T.measure_point(variants, regime, 1, args.seq_len, settings, torch.device("cpu"), ms.model.config.vocab_size)
        res[regime] = {name: float(np.median([x["time_ms"] for x in rs])) for name, rs in r.items()}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--num-routed-layers", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--what-if", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    model, _ = load_model(a.model)
    ms = V.prepare_models(model, config=MindSkipConfig(num_routed_layers=a.num_routed_layers))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, a.seq_len), generator=g)
    step = torch.randint(0, model.config.vocab_size, (1, 1), generator=g)
    n = len(ms.routed_layers)
    print(f"{a.model}, {n} routed sublayers ({ms.config.granularity}) force-skipped, batch 1, length {a.seq_len}, "
          f"threads {torch.get_num_threads()}")
    ms.force(False)
    try:
        print("\n1. aten ops under rt_lib routing functions, per forward (all gates; profiler-inflated us)")
        for phase, rows in attribution(ms.model, prompt, step, a.seq_len).items():
            for fn, (ops, us) in rows.items():
                print(f"  {phase:7s} {ops:6.0f} ops ({ops / n:4.1f}/gate) {us:8.0f} us  {fn}")
        print("\n2. one gate in isolation vs the removed-sublayer stand-in (us per call, best of 5 x 2000)")
        for phase, (tg, ts, n_ops) in isolated_gate(ms, prompt, step, a.seq_len).items():
            print(f"  {phase:7s} gate {tg:7.1f} us ({n_ops} aten ops)  removed {ts:6.1f} us  "
                  f"-> {(tg - ts) * n / 1e3:.2f} ms per forward for {n} gates")
    finally:
        ms.force(None)
    if a.what_if:
        print(f"\n3. interleaved medians, {a.repeats} rounds (ms; decode per token)")
        for regime, med in what_if(ms, a).items():
            o = med["oracle"]
            print(f"  {regime:7s} " + "  ".join(f"{k} {v:.2f}" for k, v in med.items()))
            print(f"  {'':7s} static_drop/oracle {med['static_drop'] / o:.3f} (noise floor)  "
                  f"forced/oracle {med['mindskip_forced'] / o:.3f}  gates_removed/oracle {med['gates_removed'] / o:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where MindSkip's forced skip spends time that the physically removed sublayer does not.

Not a test. On the embedded model with every routed attention sublayer force-skipped:
1. torch.profiler attribution: aten ops issued under each function of rt_lib/mindskip.py per
   forward (prefill 1 x seq_len, and one decode step), with their CPU time;
2. one gate called in isolation with the arguments it receives in the model, against the
   stand-in that `drop_sublayers` puts in place of a removed sublayer (us per call);
3. with --what-if: one interleaved profiler run of dense, oracle, static_drop of the same
   layers (identical code to the oracle: the noise floor), the forced skip as it is, and the
   forced skip with the gate's per-call bookkeeping left out (a patch applied only inside
   this process, only while that variant runs).

    python benchmarks/skip_overhead.py [--what-if --repeats 20]
"""

import argparse
import collections
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import rt_lib.mindskip as M
from rt_lib import profiling as P
from rt_lib.assets import load_model
from rt_lib.config import MindSkipConfig


def attribution(model, prompt, step, seq_len):
    """aten ops (and their CPU us) under each rt_lib/mindskip.py function, per forward."""
    out = {}
    with torch.inference_mode():
        for phase in ("prefill", "decode"):
            cache = P._new_cache(model)
            P._step(model, prompt, cache, 0)
            n = 1 if phase == "prefill" else 10
            with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
                if phase == "prefill":
                    P._step(model, prompt, P._new_cache(model), 0)
                else:
                    for i in range(n):
                        P._step(model, step, cache, seq_len + i)
            ops, us = collections.Counter(), collections.Counter()
            for e in prof.events():
                if not e.name.startswith("aten::"):
                    continue
                par, top, owner = e.cpu_parent, True, None
                while par is not None:
                    top = top and not par.name.startswith("aten::")
                    if owner is None and "mindskip.py(" in par.name:
                        owner = par.name.split("rt_lib/")[-1]
                    par = par.cpu_parent
                if owner:
                    ops[owner] += 1
                    us[owner] += e.cpu_time_total if top else 0
            out[phase] = {k: (ops[k] / n, us[k] / n) for k in sorted(ops, key=lambda k: -us[k])}
    return out


def isolated_gate(ms, model, prompt, step, seq_len, calls=2000):
    """us per call of one forced-skip gate and of the removed-sublayer stand-in, same arguments."""
    gate = ms.gates[ms.routed_layers[len(ms.routed_layers) // 2]]
    seen = []
    hook = gate.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))), with_kwargs=True)
    with torch.inference_mode():
        cache = P._new_cache(model)
        P._step(model, prompt, cache, 0)
        P._step(model, step, cache, seq_len)
    hook.remove()
    stub = M._Removed("attn", gate.base_layer)
    ctx = gate._ctx

    def per_call(fn):
        for _ in range(50):
            fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        return best

    out = {}
    with torch.inference_mode():
        for phase, (args, kw), past in (("prefill", seen[0], 0), ("decode", seen[1], seq_len)):
            # the routing context as the decoder hook leaves it for this call
            hs = args[0] if args else kw["hidden_states"]
            ctx.past_len, ctx.cache = past, cache
            ctx.real = torch.ones(hs.shape[:2], dtype=torch.bool, device=hs.device)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                gate(*args, **kw)
            n_ops = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
            out[phase] = (per_call(lambda: gate(*args, **kw)), per_call(lambda: stub(*args, **kw)), n_ops)
    return out


LEAN = {"on": False}


def _install_lean_patch():
    """Forced bool decisions in eval/skip mode without scores, capacity or on-device stats."""
    full = M.MindSkipGate._forward_seq

    def forward_seq(self, x, real, args, kwargs):
        if not LEAN["on"] or self.training or self.execution != "skip" or not isinstance(self.forced, bool):
            return full(self, x, real, args, kwargs)
        bsz = x.shape[0]
        self.n_exec = self.n_exec + (bsz if self.forced else 0)
        self.n_total = self.n_total + bsz
        if self.forced:
            return self.base_layer(x, *args, **kwargs)
        return self._wrap(self._skipped_output(x), self.granularity == "attn")

    M.MindSkipGate._forward_seq = forward_seq


def what_if(ms, args):
    _install_lean_patch()
    skip = list(ms.routed_layers)
    variants = P.build_variants(ms, ["dense", "oracle", "static_drop", "mindskip_forced"], skip, static_layers=skip)
    forced = variants[-1]

    def enter():
        forced.enter()
        LEAN["on"] = True

    def exit():
        LEAN["on"] = False
        forced.exit()
    variants.append(P.Variant("forced_lean", ms.model, enter, exit, forced.skip_ratio, forced.reset))
    settings = P.ProfileSettings(repeats=args.repeats, warmup=2, new_tokens=args.new_tokens)
    res = {}
    for regime in P.REGIMES:
        r = P._measure_point(variants, regime, 1, args.seq_len, settings, torch.device("cpu"), ms.model.config.vocab_size)
        res[regime] = {name: P._percentile([x["ms"] for x in rs], 50) for name, rs in r.items()}
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
    ms = P.prepare_models(model, config=MindSkipConfig(num_routed_layers=a.num_routed_layers))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, a.seq_len), generator=g)
    step = torch.randint(0, model.config.vocab_size, (1, 1), generator=g)
    n = len(ms.routed_layers)
    print(f"{a.model}, {n} routed attention sublayers force-skipped, batch 1, length {a.seq_len}, "
          f"threads {torch.get_num_threads()}")
    ms.force(False)
    try:
        print("\n1. aten ops under rt_lib/mindskip.py functions, per forward (all gates; profiler-inflated us)")
        for phase, rows in attribution(ms.model, prompt, step, a.seq_len).items():
            for fn, (ops, us) in rows.items():
                print(f"  {phase:7s} {ops:6.0f} ops ({ops / n:4.1f}/gate) {us:8.0f} us  {fn}")
        print("\n2. one gate in isolation vs the removed-sublayer stand-in (us per call, best of 5 x 2000)")
        for phase, (tg, ts, n_ops) in isolated_gate(ms, ms.model, prompt, step, a.seq_len).items():
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
                  f"forced/oracle {med['mindskip_forced'] / o:.3f}  forced_lean/oracle {med['forced_lean'] / o:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

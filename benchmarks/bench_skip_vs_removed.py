"""MindSkip with every routed attention sublayer force-skipped vs the same sublayers removed.

Not a test: a benchmark of how close MindSkip's real skipping gets to the model with those
sublayers physically removed (the oracle), on the embedded model by default. Forward
(prefill into a fresh cache) and decode (per token with the KV cache) are timed with the
profiler's protocol: warm-up, interleaved rounds of dense / skip / removed, medians, so all
ratios below come from one run.

    python benchmarks/bench_skip_vs_removed.py                  # SmolLM2-135M, 16 routed layers
    python benchmarks/bench_skip_vs_removed.py --batch 4 --repeats 20

Target: skip / removed time ratio within 1.03 in both regimes.
"""

import argparse
import sys

import torch

from rt_lib.speed import profiling as P
from rt_lib.speed import roofline as R
from rt_lib.speed import variants as V
from rt_lib.assets.loading import load_model
from rt_lib.mindskip.config import MindSkipConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--num-routed-layers", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128, help="prompt length (forward) and context length (decode)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_model(a.model, dtype=getattr(torch, a.dtype), device=device, attn_implementation="sdpa")
    ms = V.prepare_models(model, config=MindSkipConfig(num_routed_layers=a.num_routed_layers))
    settings = P.ProfileSettings(
        prefill_batch_sizes=[a.batch], prefill_seq_lens=[a.seq_len],
        decode_batch_sizes=[a.batch], decode_context_lens=[a.seq_len], new_tokens=a.new_tokens,
        variants=["dense", "mindskip_forced", "oracle"], skip_layers=list(ms.routed_layers),
        warmup=a.warmup, repeats=a.repeats, threads=a.threads,
    )
    rows, cond = P.profile(ms, settings, progress=False)

    print(f"{a.model}: {len(ms.routed_layers)} of {model.config.num_hidden_layers} attention sublayers "
          f"(layers {ms.routed_layers[0]}..{ms.routed_layers[-1]}) skipped by MindSkip (forced) / removed")
    print(f"{cond['device']} ({cond['device_name']}), {cond['dtype']}, threads={cond['threads']}, batch={a.batch}, "
          f"length={a.seq_len}, new_tokens={a.new_tokens}, warmup={a.warmup}, repeats={a.repeats} (interleaved)")
    print(f"{'regime':8s} {'dense ms':>9s} {'skip ms':>9s} {'removed ms':>10s} {'skip/removed':>12s} "
          f"{'dense/skip':>10s} {'dense/removed':>13s} {'bound':>6s}")
    worst = 0.0
    for regime in R.REGIMES:
        r = {row["variant"]: row for row in rows if row["regime"] == regime}
        if any(row["status"] != "ok" for row in r.values()):
            print(f"{regime:8s} skipped: {r['dense']['reason']}")
            continue
        d, s, o = (r[v]["median_ms"] for v in ("dense", "mindskip_forced", "oracle"))
        worst = max(worst, s / o)
        print(f"{regime:8s} {d:9.2f} {s:9.2f} {o:10.2f} {s / o:12.3f} {d / s:10.3f} {d / o:13.3f} "
              f"{r['oracle']['bound_speedup']:6.3f}")
        print(f"{'':8s} p10-p90 ms: dense {r['dense']['p10_ms']:.2f}-{r['dense']['p90_ms']:.2f}, "
              f"skip {r['mindskip_forced']['p10_ms']:.2f}-{r['mindskip_forced']['p90_ms']:.2f}, "
              f"removed {r['oracle']['p10_ms']:.2f}-{r['oracle']['p90_ms']:.2f}")
    print(f"worst skip/removed ratio {worst:.3f} ({'within' if worst <= 1.03 else 'outside'} the 1.03 target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

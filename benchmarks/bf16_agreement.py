"""How far bfloat16 moves the dense model's scores, and how much faster it runs, on this machine.

Scores the embedded model in float32 and in bfloat16 on the same documents (the ``quick``
task set's tasks and shots, ``--limit`` documents per task) and prints, per task, the accuracy
of each and the fraction of documents whose prediction (``acc``: the chosen answer is right or
not) is the same; then the wall time of each evaluation and of a dense forward pass over
``--batch x --length`` tokens in each dtype, with the ratio. Comparisons in the kit's tables are
always made within one dtype; this says how much a change of dtype alone moves a score.

    python benchmarks/bf16_agreement.py [--limit 100] [--tasks all] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rt_lib.assets.loading import load_model, native_bf16  # noqa: E402
from rt_lib.evaluation.driver import evaluate  # noqa: E402


def forward_seconds(model, batch: int, length: int, repeats: int = 3) -> float:
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(input_ids=ids[:, :16])  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="all", help="comma list of the quick task set's tasks, or all")
    ap.add_argument("--limit", type=int, default=100, help="documents per task (MMLU: per subject)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="forward-pass timing: sequences")
    ap.add_argument("--length", type=int, default=1024, help="forward-pass timing: tokens per sequence")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = None if args.tasks == "all" else args.tasks.split(",")
    print(f"native bf16 on this CPU: {native_bf16('cpu')}; threads {torch.get_num_threads()}", flush=True)
    runs, forward = {}, {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model("smollm2-135m-instruct", dtype=dtype)
        forward[dtype] = forward_seconds(model, args.batch, args.length)
        t0 = time.perf_counter()
        res = evaluate(model, tok, task_set="quick", tasks=tasks, limit=args.limit, batch_size=args.batch_size)
        runs[dtype] = (res, time.perf_counter() - t0)
        print(f"{dtype}: evaluation {runs[dtype][1]:.1f} s, forward {args.batch}x{args.length} "
              f"{forward[dtype]:.2f} s", flush=True)
    (f32, t32), (b16, t16) = runs["float32"], runs["bfloat16"]
    total_same = total = 0
    print(f"\n{'task':14s} {'n':>5s} {'fp32 acc':>9s} {'bf16 acc':>9s} {'same prediction':>16s}")
    for task in f32.per_doc["dense"]:
        a = f32.doc_scores("dense", task, "acc")
        b = b16.doc_scores("dense", task, "acc")
        same = sum(a[k] == b[k] for k in a)
        total_same, total = total_same + same, total + len(a)
        print(f"{task:14s} {len(a):5d} {100 * sum(a.values()) / len(a):9.1f} {100 * sum(b.values()) / len(b):9.1f} "
              f"{same / len(a):16.3f}")
    print(f"{'all':14s} {total:5d} {'':9s} {'':9s} {total_same / total:16.3f}")
    print(f"\nevaluation wall time: float32 {t32:.1f} s, bfloat16 {t16:.1f} s, ratio {t32 / t16:.2f}x")
    print(f"dense forward {args.batch}x{args.length}: float32 {forward['float32']:.2f} s, bfloat16 "
          f"{forward['bfloat16']:.2f} s, ratio {forward['float32'] / forward['bfloat16']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

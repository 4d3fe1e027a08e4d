"""Vocabulary logits only where the harness reads them: time and scores, both ways, in one run.

HFLM computes the vocabulary logits (and their log-softmax) at every position of every padded
request, then reads only the continuation positions. ``MindSkipLM(logits_where_read=True)``
(the default) asks the model for the trailing positions that hold every continuation of the
batch. This benchmark evaluates the same documents both ways, alternating the order
(off, on, on, off, ...), and prints the wall time of each round, the median ratio, and how
far the per-document log-likelihoods and predictions of the two ways differ.

    python benchmarks/eval_logits.py [--tasks piqa,hellaswag,arc_challenge] [--limit 100] [--rounds 2] [--task-set quick]
        [--routers results/runs/cpu-main/train/routers] [--dtype float32] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rt_lib.assets.loading import load_model  # noqa: E402
from rt_lib.cli.flags import add_deprecated_alias  # noqa: E402
from rt_lib.evaluation.driver import evaluate  # noqa: E402
from rt_lib.mindskip.model import MindSkipModel  # noqa: E402


def one_round(ms, tok, args, where_read: bool):
    t0 = time.perf_counter()
    res = evaluate(ms, tok, task_set=args.task_set, tasks=args.tasks.split(","), limit=args.limit,
                   batch_size=args.batch_size, logits_where_read=where_read)
    return time.perf_counter() - t0, res


def compare(a, b) -> tuple[float, float, int]:
    """Max |difference| of per-document scores, fraction of equal predictions, documents."""
    worst, same, n = 0.0, 0, 0
    for variant, tasks in a.per_doc.items():
        for task, docs in tasks.items():
            other = b.per_doc[variant][task]
            for metric in ("acc", "acc_norm"):
                if metric in docs:
                    same += sum(x == y for x, y in zip(docs[metric], other[metric]))
                    n += len(docs[metric])
    for variant in a.harness:
        for task in a.harness[variant]:
            la = a.table[(a.table.variant == variant) & (a.table.task == task)].value.to_numpy()
            lb = b.table[(b.table.variant == variant) & (b.table.task == task)].value.to_numpy()
            worst = max(worst, float(abs(la - lb).max())) if len(la) else worst
    return worst, same / max(n, 1), n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="piqa,hellaswag,arc_challenge")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--task-set", default="quick", help="task set: quick (0-shot) or offline (the paper's shots)")
    add_deprecated_alias(ap, "--preset", "--task-set")
    ap.add_argument("--rounds", type=int, default=2, help="pairs of (off, on) runs, order alternating")
    ap.add_argument("--routers", default="results/runs/cpu-main/train/routers")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m-instruct", dtype=args.dtype)
    ms = MindSkipModel.from_pretrained(model, args.routers)
    ms.eval()
    times = {False: [], True: []}
    results = {}
    for r in range(args.rounds):
        for where_read in ((False, True) if r % 2 == 0 else (True, False)):
            secs, res = one_round(ms, tok, args, where_read)
            times[where_read].append(secs)
            results[where_read] = res
            print(f"round {r + 1}: logits {'where read' if where_read else 'everywhere'}: {secs:.1f} s "
                  f"(dense + MindSkip, {args.task_set} {args.tasks}, {args.limit} docs/task)", flush=True)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    worst, agree, n = compare(results[False], results[True])
    print(f"median: everywhere {off:.1f} s, where read {on:.1f} s, ratio {off / on:.2f}x")
    print(f"scores: max |difference| of task accuracies {worst:.2e}; per-document predictions equal "
          f"{agree:.4f} of {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

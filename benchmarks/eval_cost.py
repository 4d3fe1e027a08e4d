"""How much work an evaluation task set is, before running it.

Builds every request of a task set exactly as ``rt_lib.evaluation.driver.evaluate`` would (same
harness tasks, shots, limits, few-shot sampler, tokenizer and truncation), but scores nothing:
a counting harness model records the model inputs HFLM would run. It prints, per task, the
documents, requests, distinct forward passes (HFLM shares one pass among requests whose
context + continuation[:-1] agree, e.g. MMLU's one-letter answers) and input tokens, plus the
padded tokens with the given batch size. With ``--measure`` it also times the dense model's
forward pass on this machine at a few lengths and estimates the wall time of one dense pass
over the task set (a MindSkip variant costs about as much again, minus what it skips).

    python benchmarks/eval_cost.py --task-set offline [--tasks hellaswag,piqa] [--measure]

Writes a JSON summary with ``--out FILE``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rt_lib.cli.flags import add_deprecated_alias  # noqa: E402
from rt_lib.evaluation.driver import DEFAULT_SEEDS, check_request, harness_samples  # noqa: E402
from rt_lib.evaluation.harness import MindSkipLM, load_task, task_manager  # noqa: E402


class CountingLM(MindSkipLM):
    """HFLM's request handling and tokenisation; records the inputs instead of running them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inputs: list[tuple[int, ...]] = []
        self.n_requests = 0

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        self.n_requests += len(requests)
        for _, ctx, cont in requests:
            # HFLM: one forward per distinct context + continuation[:-1]; input truncated to max_length
            self.inputs.append(tuple((ctx + cont)[-(self.max_length + 1):][:-1]))
        return [(-1.0, False)] * len(requests)


def padded_batches(lengths: list[int], batch_size: int) -> list[tuple[int, int]]:
    """(rows, padded length) of each batch: HFLM sorts inputs longest first and pads to the first."""
    s = sorted(lengths, reverse=True)
    return [(len(s[i:i + batch_size]), s[i]) for i in range(0, len(s), batch_size)]


def measure(model, batch_size: int, lengths=(64, 256, 1024), repeats: int = 2) -> dict[int, float]:
    """Seconds per forward pass of ``batch_size`` rows at each length (median of repeats)."""
    out = {}
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for L in lengths:
            x = torch.randint(0, vocab, (batch_size, L))
            model(input_ids=x[:, :8])  # warm-up
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(input_ids=x)
                times.append(time.perf_counter() - t)
            out[L] = sorted(times)[len(times) // 2]
            print(f"  forward b{batch_size} x {L} tokens: {out[L]:.2f} s ({batch_size * L / out[L]:.0f} tokens/s)", flush=True)
    return out


def estimate(batches: list[tuple[int, int]], per_batch: dict[int, float], batch_size: int) -> float:
    """Linear interpolation of seconds per full batch in the padded length (rows scale linearly)."""
    pts = sorted(per_batch.items())

    def cost(L):
        for (l0, t0), (l1, t1) in zip(pts, pts[1:]):
            if L <= l1:
                return t0 + (t1 - t0) * (L - l0) / (l1 - l0) if L >= l0 else t0 * L / l0
        (l0, t0), (l1, t1) = pts[-2], pts[-1]
        return t1 + (t1 - t0) * (L - l1) / (l1 - l0)

    return sum(cost(L) * rows / batch_size for rows, L in batches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task-set", default="offline", help="a name of rt_lib.evaluation.tasks.TASK_SETS")
    add_deprecated_alias(ap, "--preset", "--task-set")
    ap.add_argument("--pretrained", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", default=None, help="comma list of standard task names (default: the task set's)")
    ap.add_argument("--limit", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--measure", action="store_true", help="time the dense forward pass and estimate wall time")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the summary as JSON")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    from lm_eval import simple_evaluate

    tasks = a.tasks.split(",") if a.tasks else None
    p, names = check_request(a.task_set, tasks, a.limit, a.batch_size)
    tm = task_manager(p.offline)
    lm = CountingLM(pretrained=a.pretrained, batch_size=a.batch_size)
    rows, all_batches = [], []
    t_build = time.perf_counter()
    for task in names:
        _, obj = load_task(tm, p, task)
        lim = a.limit if a.limit is not None else p.limits.get(task)
        samples = harness_samples(p, obj, lim)
        lm.inputs, lm.n_requests = [], 0
        res = simple_evaluate(model=lm, tasks=[obj], num_fewshot=p.shots[task], limit=lim, samples=samples,
                              batch_size=a.batch_size, task_manager=tm, bootstrap_iters=0, **DEFAULT_SEEDS)
        n_docs = sum(s.get("effective", 0) for s in res.get("n-samples", {}).values())
        distinct = set(lm.inputs)
        lengths = [len(x) for x in distinct]
        batches = padded_batches(lengths, a.batch_size)
        all_batches += batches
        rows.append({"task": task, "shots": p.shots[task], "docs": n_docs, "requests": lm.n_requests,
                     "forward_passes": len(distinct), "input_tokens": sum(lengths),
                     "padded_tokens": sum(r * L for r, L in batches), "max_len": max(lengths, default=0),
                     "mean_len": round(sum(lengths) / max(len(lengths), 1), 1)})
        print(json.dumps(rows[-1]), flush=True)
    build_s = time.perf_counter() - t_build
    total = {k: sum(r[k] for r in rows) for k in ("docs", "requests", "forward_passes", "input_tokens", "padded_tokens")}
    print(f"\n{'task':<14}{'shots':>6}{'docs':>8}{'requests':>10}{'passes':>9}{'tokens':>12}{'padded':>12}{'mean len':>10}")
    for r in rows:
        print(f"{r['task']:<14}{r['shots']:>6}{r['docs']:>8}{r['requests']:>10}{r['forward_passes']:>9}"
              f"{r['input_tokens']:>12,}{r['padded_tokens']:>12,}{r['mean_len']:>10}")
    print(f"{'total':<14}{'':>6}{total['docs']:>8}{total['requests']:>10}{total['forward_passes']:>9}"
          f"{total['input_tokens']:>12,}{total['padded_tokens']:>12,}")
    print(f"(requests built in {build_s:.0f} s)")
    summary = {"task_set": a.task_set, "model": a.pretrained, "batch_size": a.batch_size, "tasks": rows, "total": total}
    if a.measure:
        print(f"\ntiming the dense forward pass ({torch.get_num_threads()} threads, os.cpu_count {os.cpu_count()}):")
        per_batch = measure(lm.model, a.batch_size)
        est = estimate(all_batches, per_batch, a.batch_size)
        summary.update({"seconds_per_batch": per_batch, "threads": torch.get_num_threads(),
                        "estimated_dense_seconds": round(est, 1)})
        print(f"estimated dense pass over the task set: {est:,.0f} s = {est / 3600:.1f} h "
              f"(a MindSkip variant with its dense reference: about twice that)")
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

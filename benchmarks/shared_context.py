"""Shared-context scoring against one forward per request: work, wall time, and what the routing
input changes.

Part 1, speed (dense model, per task): the same requests scored with ``routing_input="context"``
(each context prefilled once, its continuations on its KV cache: ``rt_lib.evaluation.shared_context``)
and ``"context+continuation"`` (HFLM's computation, one forward per distinct request input). Per
task: documents, requests, input tokens each path computes, their ratio, wall time of each
(harness request building included, measured in this one run, alternating order) and the speedup;
the largest difference between the two paths' log-likelihoods.

Part 2, semantics (MindSkip routers, per task): the routers decide from the context alone, or pool
over context + continuation; per document, how many answers change, the accuracy of each and the
paired difference, and the realised skip ratio of each.

    python benchmarks/shared_context.py --limit 200 --semantics-limit 500 \\
        --routers results/runs/cpu-main/train/routers --out results/benchmarks/shared-context-cpu

Part 3, packing (dense model, per task): the shared-context path with each context's
continuations packed into its row (one custom attention mask) against each continuation in a row
of its own (its context's cache rows repeated): positions computed by each (padding included),
positions projected to the vocabulary, wall time of the scoring alone (requests recorded once, the
two alternating, ``--packing-repeats`` times each), and the documents per hour that follow.

    python benchmarks/shared_context.py --tasks "" --semantics-tasks "" --packing-tasks hellaswag,piqa \
        --packing-limit 200 --out results/benchmarks/shared-context-packing

Writes ``speed.csv``, ``semantics.csv``, ``packing.csv`` and ``summary.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from rt_lib import files  # noqa: E402
from rt_lib.cli.flags import add_deprecated_alias  # noqa: E402
from rt_lib.evaluation import harness  # noqa: E402
from rt_lib.evaluation.driver import evaluate  # noqa: E402

TASKS = ("hellaswag", "piqa", "arc_challenge", "openbookqa", "winogrande", "boolq", "rte", "mmlu")


class Recorder:
    """Records the token requests the harness sends to ``MindSkipLM._loglikelihood_tokens``."""

    def __init__(self):
        self.requests: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.original = harness.MindSkipLM._loglikelihood_tokens

    def __enter__(self):
        rec = self

        def recording(lm, requests, *args, **kwargs):
            rec.requests += [(tuple(ctx), tuple(cont)) for _, ctx, cont in requests]
            rec.max_length = lm.max_length
            return rec.original(lm, requests, *args, **kwargs)

        harness.MindSkipLM._loglikelihood_tokens = recording
        return self

    def __exit__(self, *exc):
        harness.MindSkipLM._loglikelihood_tokens = self.original

    def tokens(self) -> dict[str, int]:
        """Input tokens each path computes: one forward per distinct (context + continuation)[:-1]
        (HFLM runs identical inputs once), against each distinct context once plus every
        continuation but its last token."""
        n = self.max_length
        whole = {(c + k)[-(n + 1):][:-1] for c, k in self.requests}
        contexts = {c for c, _ in self.requests}
        return {"requests": len(self.requests), "contexts": len(contexts),
                "tokens_per_request": sum(map(len, whole)),
                "tokens_shared_context": sum(map(len, contexts)) + sum(len(k) - 1 for _, k in self.requests)}


def speed(base, tok, task: str, limit, batch_size: int, task_set: str) -> dict:
    out, lls = {}, {}
    for order, routing in enumerate(("context+continuation", "context")):
        with Recorder() as rec:
            t0 = time.perf_counter()
            res = evaluate(base, tok, task_set=task_set, tasks=[task], limit=limit, batch_size=batch_size,
                           variant="dense", routing_input=routing)
            out[routing] = time.perf_counter() - t0
        if routing == "context":
            out.update(rec.tokens())
        docs = res.per_doc["dense"][task]
        lls[routing] = np.asarray(docs.get("ll_gold", []), dtype=float)
        out["documents"] = len(docs["keys"])
    a, b = lls["context"], lls["context+continuation"]
    return {"task": task, "documents": out["documents"], "requests": out["requests"], "contexts": out["contexts"],
            "tokens_per_request": out["tokens_per_request"], "tokens_shared_context": out["tokens_shared_context"],
            "token_ratio": out["tokens_per_request"] / max(out["tokens_shared_context"], 1),
            "wall_per_request_s": round(out["context+continuation"], 2), "wall_shared_context_s": round(out["context"], 2),
            "speedup": out["context+continuation"] / out["context"],
            "max_abs_ll_gold_diff": float(np.max(np.abs(a - b))) if len(a) and len(a) == len(b) else None}


def padded_positions(requests, max_length: int, batch_size: int, packed: bool) -> dict:
    """Positions each continuation pass computes (padding included) and positions projected."""
    from rt_lib.evaluation.shared_context import plan_groups

    groups, _ = plan_groups(requests, max_length)
    ctxs = list(groups)
    prefill = cont = projected = 0
    for s in range(0, len(ctxs), batch_size):
        chunk = ctxs[s:s + batch_size]
        prefill += max(map(len, chunk)) * len(chunk)
        lens = [[len(requests[i][1]) - 1 for i in groups[c]] for c in chunk]
        if packed:
            cont += max(sum(x) for x in lens) * len(chunk)
            projected += sum(map(sum, lens))
        else:
            n = sum(map(len, lens))
            cont += max(max(x) for x in lens) * n
            projected += max(max(x) for x in lens) * n
    return {"prefill": prefill, "continuations": cont, "projected": projected + len(ctxs)}


def packing(base, tok, task: str, limit, batch_size: int, task_set: str, repeats: int) -> dict:
    from rt_lib.evaluation.shared_context import score_shared_context

    with Recorder() as rec:
        res = evaluate(base, tok, task_set=task_set, tasks=[task], limit=limit, batch_size=batch_size, variant="dense")
    reqs, docs = rec.requests, len(res.per_doc["dense"][task]["keys"])
    wall = {False: [], True: []}
    got = {}
    for _ in range(repeats):
        for pack in (False, True):
            t0 = time.perf_counter()
            got[pack], _ = score_shared_context(base, reqs, batch_size=batch_size, max_length=rec.max_length,
                                                pad_id=0, pack=pack)
            wall[pack].append(time.perf_counter() - t0)
    diff = max(abs(a[0] - b[0]) for a, b in zip(got[True], got[False]) if a is not None)
    row = {"task": task, "documents": docs, "requests": len(reqs)}
    for pack, name in ((False, "repeated"), (True, "packed")):
        pos = padded_positions(reqs, rec.max_length, batch_size, pack)
        row.update({f"{name}_positions": pos["prefill"] + pos["continuations"], f"{name}_projected": pos["projected"],
                    f"{name}_wall_s": round(float(np.median(wall[pack])), 2)})
    row.update({"positions_ratio": row["repeated_positions"] / row["packed_positions"],
                "speedup": row["repeated_wall_s"] / row["packed_wall_s"],
                "packed_docs_per_hour": round(3600 * docs / row["packed_wall_s"]),
                "max_abs_ll_diff": diff, "repeats": repeats})
    return row


def semantics(ms, tok, task: str, limit, batch_size: int, task_set: str) -> dict:
    from rt_lib.evaluation.stats import paired_difference

    per = {}
    for routing in ("context", "context+continuation"):
        res = evaluate(ms, tok, task_set=task_set, tasks=[task], limit=limit, batch_size=batch_size,
                       variant="mindskip", dense_reference=False, routing_input=routing)
        docs = res.per_doc["mindskip"][task]
        row = res.table[(res.table.task == task)].iloc[0]
        per[routing] = {"pred": np.asarray(docs["pred"]), "acc": np.asarray(docs["acc"], dtype=float),
                        "skip_ratio": float(row.skip_ratio)}
    c, w = per["context"], per["context+continuation"]
    p = paired_difference(c["acc"], w["acc"])
    return {"task": task, "documents": len(c["acc"]), "answers_changed": int((c["pred"] != w["pred"]).sum()),
            "acc_context": float(c["acc"].mean()), "acc_context_continuation": float(w["acc"].mean()),
            "diff": p.diff, "ci_low": p.ci_low, "ci_high": p.ci_high,
            "skip_ratio_context": c["skip_ratio"], "skip_ratio_context_continuation": w["skip_ratio"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--limit", type=int, default=100, help="documents per task for the speed part (MMLU: per subject, 2)")
    ap.add_argument("--routers", default="results/runs/cpu-main/train/routers")
    ap.add_argument("--semantics-tasks", default="hellaswag,piqa")
    ap.add_argument("--semantics-limit", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--task-set", default="evidence", help="task set (evidence: 0-shot, as the evidence run scores)")
    add_deprecated_alias(ap, "--preset", "--task-set")
    ap.add_argument("--packing-tasks", default="", help="tasks for part 3 (packed against repeated continuations)")
    ap.add_argument("--packing-limit", type=int, default=200)
    ap.add_argument("--packing-repeats", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    from rt_lib.assets.loading import load_model
    from rt_lib.runs.checkpoints import attach_routers

    base, tok = load_model(a.model, dtype=a.dtype)
    out = Path(a.out)
    rows = []
    for task in [t for t in a.tasks.split(",") if t]:
        rows.append(speed(base, tok, task, 2 if task == "mmlu" else a.limit, a.batch_size, a.task_set))
        print(json.dumps(rows[-1]), flush=True)
        files.write_csv(out / "speed.csv", rows)
    pk = []
    for task in [t for t in a.packing_tasks.split(",") if t]:
        pk.append(packing(base, tok, task, a.packing_limit, a.batch_size, a.task_set, a.packing_repeats))
        print(json.dumps(pk[-1]), flush=True)
        files.write_csv(out / "packing.csv", pk)
    ms = attach_routers(base, a.routers)
    ms.eval()
    sem = []
    try:
        for task in [t for t in a.semantics_tasks.split(",") if t]:
            sem.append(semantics(ms, tok, task, a.semantics_limit, a.batch_size, a.task_set))
            print(json.dumps(sem[-1]), flush=True)
            files.write_csv(out / "semantics.csv", sem)
    finally:
        ms.unload()
    files.atomic_write_json(out / "summary.json", {
        "task_set": a.task_set, "threads": __import__("torch").get_num_threads(), "model": a.model, "dtype": str(next(base.parameters()).dtype), "routers": a.routers,
        "threshold": ms.config.threshold, "limit": a.limit, "semantics_limit": a.semantics_limit,
        "batch_size": a.batch_size, "speed": rows, "semantics": sem, "packing": pk,
        "tokens_ratio_all": (sum(r["tokens_per_request"] for r in rows) / max(sum(r["tokens_shared_context"] for r in rows), 1)
                             if rows else None),
        "wall_ratio_all": (sum(r["wall_per_request_s"] for r in rows) / max(sum(r["wall_shared_context_s"] for r in rows), 1e-9)
                           if rows else None)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

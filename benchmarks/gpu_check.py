"""One prepared GPU check: the embedded model evaluated on the whole `offline` task preset
(dense and the committed MindSkip routers) and profiled on the `full` grid with CUDA timings.

    bash benchmarks/gpu_check.sh                  # one GPU, no network; sized for about 8 minutes
    bash benchmarks/gpu_check.sh --smoke          # the same code path on a CPU, tiny limits (~1.5 min)

Everything goes into one run folder (default ``results/runs/gpu-check-<date>``):

- ``eval/``: results.csv, paired.csv, skip_stats.csv, results.json of dense and ``mindskip``
  (``results/runs/cpu-main/train/routers`` at their threshold) on the `offline` preset's eight
  tasks with the paper's shots, every document, batch 64 in bfloat16;
- ``profile/``: profile.csv / profile.json / figure of the profiler (``rt_lib.speed.profiling``) over
  the `full` grid; points that do not fit the GPU are rows with ``status=skipped`` and the reason;
- ``gpu_check/``: the settings, one part per (variant, task) evaluation and per profile grid
  point (each written atomically, with the tokens it ran and its wall time), ``summary.json`` and
  ``summary.txt`` (what is printed at the end).

The harness builds the evaluation requests on the CPU (one core per process; MMLU's five-shot
questions take about 14 ms each), so the (variant, task) parts run in ``--workers`` processes
(default 4) sharing the GPU, the largest tasks first, each task's MindSkip part as soon as its
dense part is written. Evaluation batch 64; tokens per second are printed per part.

The check is resumable: run the same command again and it continues with the first part not
written yet (a part is a whole (variant, task) evaluation or a whole grid point), then combines
the parts into ``eval/`` and ``profile/``. A different setting for an existing folder is refused.

Timing of the profile differs from the `full` preset in its protocol only, to fit the budget:
1 warm-up and 5 timed rounds (the preset: 3 and 10), 32 generated tokens per decode point (64);
``--warmup 3 --repeats 10 --new-tokens 64`` runs the preset's protocol.
Tokens per second are the input tokens the model ran, padding included, per second of wall time
of each evaluation part (request building and scoring included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m-instruct"
ROUTERS = "results/runs/cpu-main/train/routers"
TASK_PRESET = "offline"
# the offline tasks, longest first: the harness builds MMLU's 14,042 five-shot requests on one CPU
# core at about 14 ms a question (rt_lib.pipeline.plan's request counter), HellaSwag has most tokens
TASK_ORDER = ["mmlu", "hellaswag", "arc_challenge", "boolq", "winogrande", "piqa", "openbookqa", "rte"]
GPU = {"tasks": None, "limit": None, "batch_size": 64, "profile_preset": "full", "warmup": 1, "repeats": 5,
       "new_tokens": 32, "threads": None, "workers": 4}
# one CPU thread: on a small shared machine more threads spin against other jobs (rt_lib.speed.profiling)
SMOKE = {"tasks": ["rte", "winogrande"], "limit": 4, "batch_size": 4, "profile_preset": "smoke", "warmup": None,
         "repeats": None, "new_tokens": None, "threads": 1, "workers": 1}

RESULT_FREE = {"workers"}  # settings a continued check may change: they do not change any number

log = logging.getLogger("gpu_check")


_WORKER = {}


def _init_worker(kwargs: dict, workers: int) -> None:
    """A worker process: its own check object (model loaded on first use), quiet harness logs."""
    import torch

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    check = _WORKER["check"] = GpuCheck(**kwargs)
    torch.set_num_threads(check.settings["threads"] or max(1, (os.cpu_count() or 1) // workers))


def _worker_part(variant: str, task: str) -> None:
    _WORKER["check"].eval_part(variant, task)


def _read(path: Path):
    return json.loads(Path(path).read_text())


class TokenCounter:
    """Counts the rows and input tokens (padding included) of every forward of ``model``."""

    def __init__(self, model):
        self.rows = self.tokens = self.calls = 0
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.rows += int(ids.shape[0])
            self.tokens += int(ids.numel())
            self.calls += 1

    def close(self):
        self._handle.remove()


class GpuCheck:
    """The run folder of one check; every step is a file, parts present are never recomputed."""

    def __init__(self, out: str | os.PathLike, *, smoke: bool = False, device: str | None = None,
                 batch_size: int | None = None, tasks: list[str] | None = None, limit: int | None = None,
                 warmup: int | None = None, repeats: int | None = None, new_tokens: int | None = None,
                 threads: int | None = None, workers: int | None = None, routers: str = ROUTERS,
                 dtype: str = "auto"):
        import torch

        base = dict(SMOKE if smoke else GPU)
        given = {"batch_size": batch_size, "tasks": tasks, "limit": limit, "warmup": warmup, "repeats": repeats,
                 "new_tokens": new_tokens, "threads": threads, "workers": workers}
        base.update({k: v for k, v in given.items() if v is not None})
        self.settings = {"model": MODEL, "routers": str(routers), "task_preset": TASK_PRESET, "dtype": dtype,
                         "smoke": smoke, **base}
        self.init_args = dict(out=str(out), smoke=smoke, device=device, batch_size=batch_size, tasks=tasks, limit=limit,
                              warmup=warmup, repeats=repeats, new_tokens=new_tokens, threads=threads,
                              workers=workers, routers=routers, dtype=dtype)
        self.out = Path(out)
        self.dir = self.out / "gpu_check"
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.routers = ROOT / routers if not Path(routers).is_absolute() else Path(routers)
        self._base = self._tok = None
        self.times: dict[str, float] = {}

    # -- shared state ----------------------------------------------------------------------
    def load(self):
        if self._base is None:
            from rt_lib.assets.loading import load_model

            self._base, self._tok = load_model(MODEL, dtype=self.settings["dtype"], device=self.device)
        return self._base, self._tok

    def tasks(self) -> list[str]:
        from rt_lib.evaluation.tasks import TASK_PRESETS

        return list(self.settings["tasks"] or TASK_PRESETS[TASK_PRESET].tasks)

    def check_settings(self) -> None:
        """Write gpu_check/settings.json once; refuse to continue a folder made with other settings."""
        from rt_lib import files
        from rt_lib.runs import record as runs

        path = self.dir / "settings.json"
        if path.exists():
            old = _read(path)
            changed = sorted(k for k in self.settings if k not in RESULT_FREE and old.get(k) != self.settings[k])
            if changed:
                raise SystemExit(f"error: {self.out} was started with other settings ({', '.join(changed)}: "
                                 f"{[old.get(k) for k in changed]} -> {[self.settings[k] for k in changed]}); "
                                 "continue it with the same options or choose another --out")
        else:
            files.atomic_write_json(path, self.settings)
        if not (self.out / runs.RUN_FILE).exists():
            runs.new_run(root=self.out.parent, run_id=self.out.name, preset="gpu-check",
                         parameters={"gpu_check": self.settings})

    # -- evaluation -------------------------------------------------------------------------
    def part_dir(self, variant: str, task: str) -> Path:
        return self.dir / "eval_parts" / f"{variant}__{task}"

    def _part(self, variant: str, task: str, model, score) -> None:
        """Score one (variant, task) into its part folder unless it is there already."""
        from rt_lib import files

        final = self.part_dir(variant, task)
        if (final / "eval" / "results.json").exists():
            return
        counter = TokenCounter(model)
        start = time.perf_counter()
        try:
            with files.atomic_dir(final) as tmp:
                score(tmp)
                wall = time.perf_counter() - start
                files.atomic_write_json(tmp / "throughput.json", {
                    "variant": variant, "task": task, "wall_s": round(wall, 3), "forward_calls": counter.calls,
                    "rows": counter.rows, "tokens": counter.tokens, "tokens_per_s": counter.tokens / max(wall, 1e-9),
                    "batch_size": self.settings["batch_size"], "device": self.device})
        finally:
            counter.close()
        rate = counter.tokens / max(wall, 1e-9)
        print(f"  {variant:<9} {task:<14} {wall:7.1f} s  {rate:>10,.0f} tokens/s", flush=True)

    def done(self, variant: str, task: str) -> bool:
        return (self.part_dir(variant, task) / "eval" / "results.json").exists()

    def eval_part(self, variant: str, task: str) -> None:
        """One (variant, task): dense on the base model, MindSkip paired with the dense part."""
        from rt_lib.runs.checkpoints import attach_routers
        from rt_lib.evaluation.results import EvalResults
        from rt_lib.evaluation.driver import evaluate

        if self.done(variant, task):
            return
        base, tok = self.load()
        common = dict(preset=TASK_PRESET, tasks=[task], variant=variant, batch_size=self.settings["batch_size"],
                      limit=self.settings["limit"], model_name=MODEL)
        if variant == "dense":
            self._part(variant, task, base, lambda d: evaluate(base, tok, out_dir=d, **common))
            return
        ref = EvalResults.load(self.part_dir("dense", task))
        ms = attach_routers(base, self.routers)
        ms.eval()
        try:
            self._part(variant, task, base, lambda d: evaluate(ms, tok, dense_reference=ref, out_dir=d, **common))
        finally:
            ms.unload()

    def evaluate(self, workers: int = 1) -> None:
        """Every (variant, task) part, largest tasks first; with ``workers`` > 1 in that many
        processes sharing the device (the harness builds requests on the CPU, one core per
        process), a task's MindSkip part starting as soon as its dense part is written."""
        from rt_lib.evaluation.results import EvalResults

        start = time.perf_counter()
        order = sorted(self.tasks(), key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER))
        self.fresh_eval = not any(self.done(v, t) for v in ("dense", "mindskip") for t in order)
        if workers <= 1:
            for variant in ("dense", "mindskip"):
                for task in order:
                    self.eval_part(variant, task)
        else:
            import multiprocessing
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(self.init_args, workers)) as pool:
                running = {}
                for task in order:
                    variant = "mindskip" if self.done("dense", task) else "dense"
                    if not self.done(variant, task):
                        running[pool.submit(_worker_part, variant, task)] = (variant, task)
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        variant, task = running.pop(f)
                        f.result()  # a failed part stops the check here; written parts stay
                        if variant == "dense" and not self.done("mindskip", task):
                            running[pool.submit(_worker_part, "mindskip", task)] = ("mindskip", task)
        parts = [EvalResults.load(self.part_dir(v, t)) for v in ("dense", "mindskip") for t in self.tasks()]
        EvalResults.combine(parts).save(self.out)
        self.times["eval_s"] = round(time.perf_counter() - start, 1)

    # -- profile ----------------------------------------------------------------------------
    def profile_settings(self):
        from rt_lib.speed.profiling import preset

        s = self.settings
        over = {k: s[k] for k in ("warmup", "repeats", "new_tokens", "threads") if s.get(k) is not None}
        return preset(s["profile_preset"], **over)

    def profile(self) -> None:
        """The grid one point at a time (each point a part), with the layer sets and roofline
        peaks fixed once for the whole grid, then profile/ as the profiler writes it."""
        import torch

        from rt_lib.speed import step as profile_step
        from rt_lib.speed import profiling as P
        from rt_lib.speed import variants as V
        from rt_lib import files
        from rt_lib.speed.roofline import Shape, measure_peaks

        base, tok = self.load()
        settings = self.profile_settings()
        start = time.perf_counter()
        ms = V.prepare_models(base, str(self.routers))
        try:
            tokens = profile_step.text_tokens(tok, "wikipedia-en")

            def fixed_sets():
                device = next(base.parameters()).device
                skip, static = P.layer_sets(ms, settings, Shape.from_config(base.config), device, tokens)
                flops, bandwidth = measure_peaks(device, next(base.parameters()).dtype)
                return {"skip_layers": skip, "static_layers": static, "peak_flops": flops, "bandwidth": bandwidth}

            path = self.dir / "profile_fixed.json"
            if not path.exists():
                files.atomic_write_json(path, fixed_sets())
            fixed = _read(path)
            point_settings = replace(settings, **fixed)
            parts = []
            for regime, batch, length in P.grid_points(settings):
                part = self.dir / "profile_parts" / f"{regime}-b{batch}-s{length}.json"
                if not part.exists():
                    grid = ({"prefill_batch_sizes": [batch], "prefill_seq_lens": [length]} if regime == "prefill"
                            else {"decode_batch_sizes": [batch], "decode_context_lens": [length]})
                    one = replace(point_settings, regimes=[regime], **grid)
                    t0 = time.perf_counter()
                    rows, cond = P.profile(ms, one, tokens, progress=False)
                    files.atomic_write_json(part, {"rows": rows, "conditions": cond,
                                                  "wall_s": round(time.perf_counter() - t0, 2)})
                    status = rows[0]["status"] if rows else "?"
                    print(f"  {regime:<8} batch {batch:>4} length {length:>5}: {status} "
                          f"({time.perf_counter() - t0:.1f} s)", flush=True)
                    if self.device == "cuda":
                        torch.cuda.empty_cache()
                parts.append(_read(part))
            rows = [r for p in parts for r in p["rows"]]
            conditions = dict(parts[0]["conditions"])
            for key in ("measurements", "sublayer_times", "bound_curves"):
                if key in conditions:
                    conditions[key] = [x for p in parts for x in p["conditions"].get(key, [])]
            conditions.update(settings=asdict(settings),
                              grid_parts="one profile() call per grid point, layer sets and peaks fixed once "
                                         "(gpu_check/profile_fixed.json)")
            profile_step.describe(conditions, wall_time_s=sum(p["wall_s"] for p in parts),
                                  preset=settings_name(self.settings), model=MODEL, routers=self.routers,
                                  text="wikipedia-en")
            profile_step.record_step(self.out, rows, conditions)
        finally:
            ms.unload()
        self.times["profile_s"] = round(time.perf_counter() - start, 1)

    # -- summary ----------------------------------------------------------------------------
    def summary(self) -> dict:
        import pandas as pd

        from rt_lib.evaluation.results import MACRO
        from rt_lib.speed.profiling import summarize

        t = pd.read_csv(self.out / "eval" / "results.csv")
        paired = pd.read_csv(self.out / "eval" / "paired.csv")
        macro = t[(t.task == MACRO) & (t.metric == "paper")].set_index("variant")
        pm = paired[(paired.task == MACRO) & (paired.metric == "paper")].set_index("variant")
        tp = [_read(p / "throughput.json") for p in sorted((self.dir / "eval_parts").iterdir())
              if (p / "throughput.json").exists()]
        throughput = {}
        for v in ("dense", "mindskip"):
            mine = [x for x in tp if x["variant"] == v]
            wall = sum(x["wall_s"] for x in mine)
            throughput[v] = {"tokens": sum(x["tokens"] for x in mine), "wall_s": round(wall, 1),
                             "tokens_per_s": round(sum(x["tokens"] for x in mine) / max(wall, 1e-9), 1)}
        if getattr(self, "fresh_eval", False) and self.times.get("eval_s"):
            tokens = sum(x["tokens"] for x in throughput.values())
            throughput["all_parts"] = {"tokens": tokens, "wall_s": self.times["eval_s"],
                                       "tokens_per_s": round(tokens / self.times["eval_s"], 1)}
        prof = pd.read_csv(self.out / "profile" / "profile.csv")
        ok = prof[prof.status == "ok"]
        skipped = prof[prof.status == "skipped"].drop_duplicates(["regime", "batch_size", "seq_len"])
        lines = summarize(ok.to_dict("records")) if len(ok) else pd.DataFrame()
        speedups = []  # per regime: the smallest, a middle and the largest measured point
        if len(lines):
            lines = lines.assign(tokens=lines.batch_size * lines.seq_len)
            for regime, sub in lines.groupby("regime", sort=False):
                sub = sub.sort_values("tokens").reset_index(drop=True)
                for i in sorted({0, len(sub) // 2, len(sub) - 1}):
                    r = sub.iloc[i]
                    speedups.append({"regime": regime, "batch_size": int(r.batch_size), "seq_len": int(r.seq_len),
                                     **{k: _num(r.get(k)) for k in ("dense_ms", "mindskip_speedup",
                                                                    "mindskip_forced_speedup", "oracle_speedup")}})
        device = _read(self.out / "profile" / "profile.json").get("device_name")
        return {
            "out": str(self.out), "device": device, "settings": self.settings,
            "accuracy": {v: {"macro": float(macro.at[v, "value"]), "n": int(macro.at[v, "n"]),
                             "skip_ratio": _num(macro.at[v, "skip_ratio"])} for v in macro.index},
            "paired_macro": {v: {"diff": float(pm.at[v, "diff"]), "ci_low": float(pm.at[v, "ci_low"]),
                                 "ci_high": float(pm.at[v, "ci_high"])} for v in pm.index},
            "throughput": throughput,
            "profile": {"points": int(prof.drop_duplicates(["regime", "batch_size", "seq_len"]).shape[0]),
                        "measured": int(ok.drop_duplicates(["regime", "batch_size", "seq_len"]).shape[0]),
                        "skipped": [{"regime": r.regime, "batch_size": int(r.batch_size), "seq_len": int(r.seq_len),
                                     "reason": r.reason} for r in skipped.itertuples()],
                        "speedups": speedups},
            "times": self.times,
        }

    def run(self) -> dict:
        from rt_lib import files

        import torch

        t0 = time.perf_counter()
        if self.settings["threads"] and self.device == "cpu":
            torch.set_num_threads(self.settings["threads"])
        self.check_settings()
        print(f"run folder: {self.out}  (device {self.device}; to continue after an interruption, run the "
              f"same command again)", flush=True)
        print(f"evaluation: {TASK_PRESET} preset, {len(self.tasks())} tasks, batch {self.settings['batch_size']}, "
              f"limit {self.settings['limit']}, {self.settings['workers']} worker process(es)", flush=True)
        self.evaluate(self.settings["workers"])
        print(f"profile: {settings_name(self.settings)} grid", flush=True)
        self.profile()
        self.times["total_s"] = round(time.perf_counter() - t0, 1)
        summary = self.summary()
        text = format_summary(summary)
        files.atomic_write_json(self.dir / "summary.json", summary)
        files.atomic_write_text(self.dir / "summary.txt", text + "\n")
        print()
        print(text, flush=True)
        return summary


def _num(x):
    import math

    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 3)


def settings_name(settings: dict) -> str:
    return settings["profile_preset"]


def _pp(x):
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}"


def format_summary(s: dict) -> str:
    acc, pm, tp = s["accuracy"], s["paired_macro"], s["throughput"]
    out = [f"GPU check {s['out']} on {s['device']}"]
    if "dense" in acc and "mindskip" in acc:
        d = pm.get("mindskip", {})
        out.append(f"accuracy ({s['settings']['task_preset']}, macro over tasks, n={acc['dense']['n']}): "
                   f"dense {_pct(acc['dense']['macro'])}, MindSkip {_pct(acc['mindskip']['macro'])} "
                   f"(skip ratio {_num(acc['mindskip']['skip_ratio'])}; paired {_pp(d.get('diff'))} "
                   f"[{_pp(d.get('ci_low'))}, {_pp(d.get('ci_high'))}])")
    out.append("throughput (input tokens incl. padding / wall s of the parts): " + ", ".join(
        f"{v} {x['tokens_per_s']:,.0f} tokens/s ({x['tokens']:,} tokens in {x['wall_s']:.0f} s)"
        for v, x in tp.items() if v != "all_parts"))
    if "all_parts" in tp:
        x = tp["all_parts"]
        out.append(f"  all parts of this call, {s['settings']['workers']} process(es): "
                   f"{x['tokens_per_s']:,.0f} tokens/s ({x['tokens']:,} tokens in {x['wall_s']:.0f} s of evaluation)")
    p = s["profile"]
    out.append(f"profile ({s['settings']['profile_preset']} grid): {p['measured']} of {p['points']} points measured, "
               f"{len(p['skipped'])} skipped" + (": " + "; ".join(
                   f"{x['regime']} b{x['batch_size']} x {x['seq_len']} ({x['reason']})" for x in p["skipped"][:3])
                   + (" ..." if len(p["skipped"]) > 3 else "") if p["skipped"] else ""))
    def x(v, unit="x"):
        return "n/a" if v is None else f"{v:.2f}{unit}"
    for r in p["speedups"]:
        out.append(f"  {r['regime']:<8} b{r['batch_size']:<4} x {r['seq_len']:<5} dense {x(r['dense_ms'], ' ms'):>10}"
                   f"  MindSkip {x(r['mindskip_speedup'])}  forced {x(r['mindskip_forced_speedup'])}"
                   f"  oracle {x(r['oracle_speedup'])}")
    out.append("times: " + ", ".join(f"{k} {v:.0f} s" for k, v in s["times"].items()))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="run folder (default results/runs/gpu-check-<date>, "
                                                "gpu-check-smoke-<date> with --smoke); an existing one is continued")
    ap.add_argument("--smoke", action="store_true", help="tiny limits, the smoke profile grid: the same code on a CPU")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--batch-size", type=int, default=None, help=f"evaluation batch (default {GPU['batch_size']})")
    ap.add_argument("--tasks", default=None, help="comma list of tasks (default: all eight)")
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; --smoke: 1)")
    ap.add_argument("--workers", type=int, default=None,
                    help=f"evaluation processes sharing the device (default {GPU['workers']}; --smoke: 1)")
    ap.add_argument("--routers", default=ROUTERS)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # one warning per harness call otherwise
    import torch

    if not a.smoke and (a.device or "cuda") == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible; this check is meant for a GPU (--smoke runs the same code on a CPU)",
              file=sys.stderr)
        return 2
    date = time.strftime("%Y%m%d")
    out = a.out or f"results/runs/gpu-check-{'smoke-' if a.smoke else ''}{date}"
    check = GpuCheck(out, smoke=a.smoke, device=a.device, batch_size=a.batch_size,
                     tasks=a.tasks.split(",") if a.tasks else None, limit=a.limit, warmup=a.warmup,
                     repeats=a.repeats, new_tokens=a.new_tokens, threads=a.threads, workers=a.workers,
                     routers=a.routers)
    check.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate dense and MindSkip models with lm-evaluation-harness 0.4.x (issue #5).

Three ways in, one harness model (``MindSkipLM``, registered as ``mindskip``):

Notebook / Python, with a model in memory (dense HF model or a ``MindSkipModel``)::

    from rt_lib.evaluation import evaluate
    res = evaluate(ms, tok, preset="quick", out_dir="results/runs/my-run")
    res.table; res.paired; res.skip_stats          # also written to my-run/eval/

For a ``MindSkipModel`` the dense reference is the same model with every router forced to
"keep" (``ms.force(True)``, exactly the base model), run on the same documents and prompts;
``paired`` holds the per-document paired difference with its confidence interval.

Command line: the harness CLI with the ``mindskip`` model registered and the kit's offline
tasks on the include path (importing ``rt_lib.evaluation`` registers the model; the plain
``lm_eval`` entry point does not import the kit, so call it through this module)::

    python -m rt_lib.evaluation --model mindskip \\
        --model_args pretrained=smollm2-135m-instruct,routers=results/runs/x/train/routers,threshold=0.5 \\
        --tasks piqa_offline,arc_challenge_offline --batch_size 8 --log_samples --output_path out/

which is ``lm_eval --model mindskip ... --include_path <kit tasks dir>``; write that folder
with ``python -m rt_lib.evaluation tasks --out DIR`` to use it with a plain ``lm_eval`` run
(``--model hf`` works with it; ``--model mindskip`` needs the module entry point above).
``pretrained`` is an embedded kit name, a local folder or a hub id (``rt_lib.assets.load_model``);
``routers`` a folder written by ``MindSkipModel.save_pretrained``; ``threshold`` overrides the
checkpoint's. Skip statistics per task land in the output JSON under ``config.mindskip``.

The kit's own run, with files per docs/results_format.md::

    python -m rt_lib.evaluation preset --pretrained smollm2-135m-instruct --preset quick \\
        [--routers DIR | --force-skip 20,22,24,26] --out results/runs/<id>

Data-parallel evaluation of large models uses the harness's own mechanism, ``accelerate``
processes that each score every N-th document, results gathered on process 0::

    accelerate launch --num_processes 8 -m rt_lib.evaluation --model mindskip \\
        --model_args pretrained=meta-llama/Meta-Llama-3-8B,routers=DIR,dtype=bfloat16 \\
        --tasks arc_challenge --num_fewshot 25 --batch_size 16

Each process loads the model onto its own device (``accelerator.device``); skip counts are
summed over processes (the harness pads the shorter shards with repeats of their last
request, which are counted too). Without GPUs the same runs on CPU processes (gloo):
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m rt_lib.evaluation ...`` (tested).
Few-shot examples of the kit's offline tasks are drawn per document
(``rt_lib.tasks.samplers.DocSeededSampler``), so scores do not depend on the number of
processes; the harness's standard tasks run through the CLI use the harness's sampler,
whose draws depend on how documents are dealt to processes (``evaluate()`` swaps in the
per-document sampler for them too). An in-memory model is always evaluated in one process.

Presets and what differs offline: ``rt_lib.tasks``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from rt_lib import stats
from rt_lib.mindskip import MindSkipModel
from rt_lib.tasks import PAPER_TASKS, PRESETS, Preset, write_offline_tasks

log = logging.getLogger(__name__)

DEFAULT_SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
RESULT_COLUMNS = ["variant", "task", "metric", "value", "stderr", "n", "num_fewshot", "threshold", "skip_ratio"]
PAIRED_COLUMNS = ["variant", "task", "metric", "diff", "ci_low", "ci_high", "n", "confidence"]
SKIP_COLUMNS = ["variant", "task", "layer", "executed_fraction"]
MACRO = "macro_avg"
ALL_TASKS = "all tasks"  # skip-count key when MindSkipLM.skip_stats_per_task is off


def routers_sha256(ms) -> str:
    """sha256 over the router weights in layer order (float32 bytes): identifies in-memory routers."""
    h = hashlib.sha256()
    for key, t in sorted(ms.router_state_dict().items(), key=lambda kv: int(kv[0].split(".")[1])):
        h.update(key.encode())
        h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _accelerator():
    """The accelerate Accelerator when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
    return acc if acc.num_processes > 1 else None


def _pick_device(device: str | None) -> str:
    """The requested device, or CPU when it is CUDA on a machine without one (as HFLM does)."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            log.info("device %r requested but CUDA is not available: using cpu", device)
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


# ------------------------------------------------------------------------- harness model
@register_model("mindskip")
class MindSkipLM(HFLM):
    """HFLM over a (MindSkip-routed) model loaded or held by the kit.

    ``pretrained``: embedded kit name / local folder / hub id (loaded with
    ``rt_lib.assets.load_model``), or an in-memory HF model or ``MindSkipModel``.
    ``routers``: router checkpoint folder, attached with ``MindSkipModel.from_pretrained``
    (which refuses a checkpoint made for another model). ``threshold``: overrides the routers'.

    Two things differ from plain HFLM, both only when routers are attached:
    - the forward gets an attention mask for the right padding the harness adds to batched
      log-likelihood requests (HFLM passes none): sequence-level routing pools over real
      tokens, so a document's routing, and score, do not depend on its batch mates;
    - skip counts (executed / total routed sublayer units per layer) are kept per task in
      ``skip_counts``; for that, requests are scored task by task (``skip_stats_per_task``).
    Without routers (a dense model) every call is HFLM's own, so scores are identical.
    """

    def __init__(
        self,
        pretrained: Any = "smollm2-135m-instruct",
        routers: str | os.PathLike | None = None,
        threshold: float | None = None,
        tokenizer: Any = None,
        dtype: str | torch.dtype | None = "float32",
        device: str | None = None,
        strict_base: bool = True,
        **kwargs,
    ) -> None:
        ms = None
        self.model_name = None
        accelerator = None
        if isinstance(pretrained, str):
            from rt_lib import assets

            accelerator = _accelerator()
            dev = str(accelerator.device) if accelerator else _pick_device(device)
            model, tok = assets.load_model(pretrained, dtype=dtype or "float32", device=dev)
            tokenizer = tokenizer if tokenizer is not None else tok
            self.model_name = pretrained
        elif isinstance(pretrained, MindSkipModel):
            ms, model = pretrained, pretrained.model
        elif isinstance(pretrained, torch.nn.Module):
            model = pretrained
        else:
            raise ValueError(f"pretrained must be a model name/folder, an HF model or a MindSkipModel, got {type(pretrained)}")
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer: pass tokenizer=...")
        self.routers_path = None
        if routers is not None:
            if ms is not None:
                raise ValueError("pretrained already carries routers (a MindSkipModel); do not also pass routers=")
            ms = load_routers(model, routers, strict_base=strict_base)
            self.routers_path = str(Path(routers).resolve())
        if threshold is not None:
            if ms is None:
                raise ValueError("threshold= needs routers: pass routers=<checkpoint dir> or a MindSkipModel")
            threshold = float(threshold)
            if not math.isfinite(threshold):
                raise ValueError(f"threshold must be a number (0 keeps everything, above 1 skips everything), got {threshold}")
            ms.set_threshold(threshold)
        self.model_name = self.model_name or getattr(model.config, "rt_kit_name", None) or getattr(model.config, "_name_or_path", "")
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        if accelerator is not None:  # HFLM skips its data-parallel setup for a model object
            self.accelerator = accelerator
            self._device = accelerator.device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        self.mindskip = ms
        # per task: requests of different tasks never share a batch (a group of 57 MMLU subjects
        # then runs 57 small batches); evaluate() runs one task or group at a time and turns it off
        self.skip_stats_per_task = True
        self.skip_counts: dict[str, dict[int, list[float]]] = {}
        self._known_inputs: set[tuple[int, ...]] = set()

    # -- routing-aware forward -------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.mindskip is not None:
            # the exact model inputs HFLM will build, to tell real tokens from right padding
            self._known_inputs = {
                tuple((ctx + cont)[-(self.max_length + 1):][:-1]) for _, ctx, cont in requests
            }
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._known_inputs = set()

    def _padding_mask(self, inps: torch.Tensor) -> torch.Tensor:
        """(B, T) mask of real tokens in a right-padded batch (padding value 0).

        The real length of a row is the shortest L >= (last non-zero position + 1) whose
        prefix is one of the inputs of this call (a real input may itself end in token 0).
        Rows not found (e.g. the batch-size probe) are taken as unpadded.
        """
        bsz, width = inps.shape
        mask = torch.ones(bsz, width, dtype=torch.long, device=inps.device)
        if not self._known_inputs:
            return mask
        for b, row in enumerate(inps.tolist()):
            end = width
            while end > 0 and row[end - 1] == 0:
                end -= 1
            for length in range(max(end, 1), width + 1):
                if tuple(row[:length]) in self._known_inputs:
                    mask[b, length:] = 0
                    break
        return mask

    def _detect_batch_size(self, requests=None, pos: int = 0):
        # the probe forwards of batch_size="auto" are not documents: keep them out of the skip counts
        if self.mindskip is None:
            return super()._detect_batch_size(requests, pos)
        saved = {i: (g.n_exec, g.n_total) for i, g in self.mindskip.gates.items()}
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            for i, g in self.mindskip.gates.items():
                g.n_exec, g.n_total = saved[i]

    def _model_call(self, inps, attn_mask=None, labels=None):
        if self.mindskip is None or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        mask = self._padding_mask(inps)
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                           enabled=self.mixed_precision_dtype is not None),
        ):
            return self.model(input_ids=inps, attention_mask=mask).logits

    # -- per-task skip statistics ------------------------------------------------------------
    def _per_task(self, method, requests, **kwargs):
        ms = self.mindskip
        if ms is None or not requests:
            return method(requests, **kwargs)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[(req.task_name or "unknown") if self.skip_stats_per_task else ALL_TASKS].append(i)
        out: list[Any] = [None] * len(requests)
        delta: dict[str, dict[int, list[float]]] = {}
        for task, idx in groups.items():
            ms.reset_stats()
            res = method([requests[i] for i in idx], **kwargs)
            delta[task] = {i: [float(g.n_exec), float(g.n_total)] for i, g in ms.gates.items()}
            for i, r in zip(idx, res):
                out[i] = r
        if self.world_size > 1:
            from accelerate.utils import gather_object

            parts = gather_object([delta])
        else:
            parts = [delta]
        for part in parts:
            for task, layers in part.items():
                acc = self.skip_counts.setdefault(task, {})
                for layer, (ex, tot) in layers.items():
                    a = acc.setdefault(int(layer), [0.0, 0.0])
                    a[0] += ex
                    a[1] += tot
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._per_task(super().loglikelihood, requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._per_task(super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._per_task(super().generate_until, requests, disable_tqdm=disable_tqdm)

    def reset_skip_counts(self) -> None:
        self.skip_counts = {}

    def skip_stats(self, tasks: Sequence[str] | None = None) -> dict[int, float]:
        """Executed fraction per routed layer, summed over ``tasks`` (default: all so far)."""
        tot: dict[int, list[float]] = {}
        for task, layers in self.skip_counts.items():
            if tasks is not None and task not in tasks:
                continue
            for layer, (ex, n) in layers.items():
                a = tot.setdefault(layer, [0.0, 0.0])
                a[0] += ex
                a[1] += n
        return {layer: (ex / n if n else math.nan) for layer, (ex, n) in sorted(tot.items())}

    def skip_ratio(self, tasks: Sequence[str] | None = None) -> float:
        ex = n = 0.0
        for task, layers in self.skip_counts.items():
            if tasks is None or task in tasks:
                for e, t in layers.values():
                    ex += e
                    n += t
        return 1.0 - ex / n if n else math.nan

    def get_model_info(self) -> dict:
        # HFLM's version asks the hub for a model sha; the kit records its own provenance
        model = self._model
        info = {
            "model_name": self.model_name,
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(next(model.parameters()).dtype),
        }
        ms = self.mindskip
        if ms is not None:
            info["mindskip"] = {
                "routers": self.routers_path,
                "routers_sha256": _file_sha256(Path(self.routers_path) / "routers.safetensors") if self.routers_path else None,
                "router_weights_sha256": routers_sha256(ms),
                "threshold": ms.config.threshold,
                "routed_layers": list(ms.routed_layers),
                "config": ms.config.to_dict(),
                "skip_ratio": {t: self.skip_ratio([t]) for t in self.skip_counts},
                "executed_fraction": {t: self.skip_stats([t]) for t in self.skip_counts},
            }
        return info


def load_routers(model, routers: str | os.PathLike, strict_base: bool = True):
    """Attach a router checkpoint to ``model``; a clear ValueError if it does not fit."""
    try:
        return MindSkipModel.from_pretrained(model, routers, strict_base=strict_base)
    except FileNotFoundError as e:
        raise ValueError(f"{e}. Pass routers=<folder written by MindSkipModel.save_pretrained>.") from e
    except ValueError as e:
        raise ValueError(
            f"{e}. Evaluate these routers with the model they were tuned on (pretrained=...), "
            "or tune routers for this model first."
        ) from e


# ------------------------------------------------------------------------- input checks
def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def check_request(preset: str, tasks: Sequence[str] | None, limit: Any, batch_size: Any) -> tuple[Preset, list[str]]:
    """Validate preset/tasks/limit/batch size before anything is loaded or run."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    if tasks is None:
        names = p.tasks
    else:
        if isinstance(tasks, str):
            tasks = [t for t in tasks.split(",") if t]
        names = [t.removesuffix("_offline") for t in tasks]
        unknown = [t for t, n in zip(tasks, names) if n not in p.shots]
        if unknown:
            raise ValueError(
                f"unknown task(s) {unknown} for preset {preset!r}; choose from {', '.join(p.tasks)} "
                "(the paper's eight benchmarks; other harness tasks: use the lm_eval CLI through "
                "`python -m rt_lib.evaluation`)"
            )
        if not names:
            raise ValueError("tasks is empty; pass None for all tasks of the preset")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tasks in {list(tasks)}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise ValueError(f"limit must be a positive number of documents (or a fraction in (0, 1)), got {limit!r}")
        if limit <= 0:
            raise ValueError(f"limit={limit} would score no documents; use limit=None for all, or a positive number")
        if isinstance(limit, float) and limit > 1 and not limit.is_integer():
            raise ValueError(f"limit={limit}: give a whole number of documents or a fraction in (0, 1)")
    if isinstance(batch_size, str):
        if not batch_size.startswith("auto"):
            raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
    if not p.offline and (_truthy_env("HF_HUB_OFFLINE") or _truthy_env("HF_DATASETS_OFFLINE")):
        raise ValueError(
            f"preset {preset!r} loads the standard datasets from the Hugging Face hub, but "
            "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set: use preset='offline' (same prompts and "
            "metrics over the embedded data) or run where the hub is reachable"
        )
    return p, names


# ------------------------------------------------------------------------- results
@dataclass
class EvalResults:
    """Tables of one evaluation (docs/results_format.md) plus per-document scores."""

    preset: str
    table: Any  # pandas DataFrame, results.csv
    paired: Any  # paired.csv
    skip_stats: Any  # skip_stats.csv
    per_doc: dict[str, dict[str, dict[str, dict]]]  # variant -> task -> {"keys", metric lists, "prompt_hash"}
    tasks: dict[str, dict]  # task -> settings (harness task, shots, limit, metric, splits, fewshot source)
    provenance: dict
    wall_time_s: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> task -> s
    harness: dict = field(default_factory=dict)  # variant -> task -> harness results (no samples)

    def doc_scores(self, variant: str, task: str, metric: str) -> dict[tuple[str, int], float]:
        d = self.per_doc[variant][task]
        return {tuple(k): v for k, v in zip(d["keys"], d[metric])}

    def summary(self):
        """Wide table: one row per task; value, stderr (and skip ratio) per variant; each variant's
        paired difference to dense with its confidence interval."""
        import pandas as pd

        t = self.table
        metric_of = {k: v["metric"] for k, v in self.tasks.items()}
        rows = []
        macro = [MACRO] if (t.task == MACRO).any() else []  # one task: no macro average
        for task in [*self.tasks, *macro]:
            metric = metric_of.get(task, "paper")
            row = {"task": task, "metric": metric}
            for _, r in t[(t.task == task) & (t.metric == metric)].iterrows():
                row[r.variant] = r.value
                row[f"{r.variant}_stderr"] = r.stderr
                if r.variant != "dense" and r.skip_ratio == r.skip_ratio and r.skip_ratio is not None:
                    row[f"{r.variant}_skip_ratio"] = r.skip_ratio
            p = self.paired
            if len(p):
                for _, r in p[(p.task == task) & (p.metric == metric)].iterrows():
                    row[f"{r.variant}-dense"] = r["diff"]
                    row[f"{r.variant}-dense ci"] = f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
            rows.append(row)
        return pd.DataFrame(rows)

    def to_json(self) -> dict:
        return {
            "preset": self.preset,
            "provenance": self.provenance,
            "tasks": self.tasks,
            "results": _records(self.table),
            "paired": _records(self.paired),
            "skip_stats": _records(self.skip_stats),
            "wall_time_s": self.wall_time_s,
            "per_doc": self.per_doc,
            "harness": self.harness,
        }

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``<run_dir>/eval/{results,paired,skip_stats}.csv`` and ``results.json``; record in run.json."""
        from rt_lib import runs

        run_dir = Path(run_dir)
        if not (run_dir / runs.RUN_FILE).exists():
            runs.new_run(root=run_dir.parent, run_id=run_dir.name, preset=self.preset,
                         parameters={"eval": self.provenance.get("parameters", {})})
        eval_dir = run_dir / "eval"
        runs.write_csv(eval_dir / "results.csv", self.table, RESULT_COLUMNS)
        runs.write_csv(eval_dir / "paired.csv", self.paired, PAIRED_COLUMNS)
        runs.write_csv(eval_dir / "skip_stats.csv", self.skip_stats, SKIP_COLUMNS)
        runs.atomic_write_json(eval_dir / "results.json", self.to_json())
        runs.update_run(run_dir, "eval", {
            "preset": self.preset,
            "variants": sorted(set(self.table.variant)) if len(self.table) else [],
            "tasks": list(self.tasks),
            "wall_time_s": {v: round(sum(t.values()), 2) for v, t in self.wall_time_s.items()},
            "files": ["eval/results.csv", "eval/paired.csv", "eval/skip_stats.csv", "eval/results.json"],
        })
        return eval_dir

    def only(self, variants: Sequence[str], tasks: Sequence[str] | None = None) -> "EvalResults":
        """The same result restricted to some variants (and tasks), e.g. a run's dense scores to
        reuse as the dense reference of another run on the same documents."""
        missing = [v for v in variants if v not in self.per_doc]
        if missing:
            raise ValueError(f"no variant(s) {missing} in these results (have {sorted(self.per_doc)})")
        tasks = list(self.tasks) if tasks is None else list(tasks)
        absent = [t for t in tasks if t not in self.tasks]
        if absent:
            raise ValueError(f"no task(s) {absent} in these results (have {list(self.tasks)})")

        kept_tasks = tasks + ([MACRO] if len(tasks) == len(self.tasks) else [])  # a subset has no macro

        def keep(frame):
            return frame[frame.variant.isin(list(variants)) & frame.task.isin(kept_tasks)].reset_index(drop=True)

        def sub(d):
            return {v: {t: x for t, x in d[v].items() if t in tasks} for v in variants if v in d}

        return EvalResults(preset=self.preset, table=keep(self.table), paired=keep(self.paired),
                           skip_stats=keep(self.skip_stats), per_doc=sub(self.per_doc),
                           tasks={t: self.tasks[t] for t in tasks}, provenance=dict(self.provenance),
                           wall_time_s=sub(self.wall_time_s), harness=sub(self.harness))

    @classmethod
    def combine(cls, parts: Sequence["EvalResults"]) -> "EvalResults":
        """One result from evaluations of several variants on the same preset, tasks and
        documents (e.g. MindSkip at several thresholds and static drop, each paired with the
        same dense run). Rows of a variant present in several parts are kept once (first)."""
        import pandas as pd

        if not parts:
            raise ValueError("nothing to combine")
        first = parts[0]
        def docs(r):  # what decides which documents and prompts are scored
            return r.preset, {t: tuple(str(v.get(k)) for k in ("limit", "num_fewshot", "metric"))
                              for t, v in r.tasks.items()}

        for p in parts[1:]:
            if docs(p) != docs(first):
                raise ValueError("can only combine evaluations of the same preset and tasks (same documents); "
                                 f"got {first.preset}/{sorted(first.tasks)} and {p.preset}/{sorted(p.tasks)}")

        table = pd.concat([p.table for p in parts], ignore_index=True).drop_duplicates(
            subset=["variant", "task", "metric"], keep="first", ignore_index=True)
        paired = pd.concat([p.paired for p in parts], ignore_index=True).drop_duplicates(
            subset=["variant", "task", "metric"], keep="first", ignore_index=True)
        skip = pd.concat([p.skip_stats for p in parts], ignore_index=True).drop_duplicates(
            subset=["variant", "task", "layer"], keep="first", ignore_index=True)
        merged = {"per_doc": {}, "wall_time_s": {}, "harness": {}}
        for p in parts:
            for attr, acc in merged.items():
                for variant, value in getattr(p, attr).items():
                    acc.setdefault(variant, value)
        provenance = dict(first.provenance)
        provenance["parts"] = [p.provenance for p in parts]
        return cls(preset=first.preset, table=table, paired=paired, skip_stats=skip, per_doc=merged["per_doc"],
                   tasks=first.tasks, provenance=provenance, wall_time_s=merged["wall_time_s"],
                   harness=merged["harness"])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalResults":
        """Read ``results.json`` (a run folder, its eval/ folder or the file) back, e.g. as a dense reference."""
        import pandas as pd

        path = Path(path)
        if path.is_dir():
            path = path / "results.json" if (path / "results.json").exists() else path / "eval" / "results.json"
        d = json.loads(path.read_text())
        return cls(
            preset=d["preset"],
            table=pd.DataFrame(d["results"], columns=RESULT_COLUMNS),
            paired=pd.DataFrame(d["paired"], columns=PAIRED_COLUMNS),
            skip_stats=pd.DataFrame(d["skip_stats"], columns=SKIP_COLUMNS),
            per_doc=d["per_doc"],
            tasks=d["tasks"],
            provenance=d["provenance"],
            wall_time_s=d.get("wall_time_s", {}),
            harness=d.get("harness", {}),
        )


def _records(frame) -> list[dict]:
    if frame is None or not len(frame):
        return []
    return json.loads(frame.to_json(orient="records"))


def _float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# ------------------------------------------------------------------------- evaluate()
_TASK_MANAGERS: dict[str, Any] = {}


def task_manager(offline: bool = True):
    """A harness TaskManager that knows the kit's offline tasks (indexing takes seconds: cached)."""
    from lm_eval.tasks import TaskManager

    include = str(write_offline_tasks()) if offline else ""
    if include not in _TASK_MANAGERS:
        _TASK_MANAGERS[include] = TaskManager(include_path=include or None)
    return _TASK_MANAGERS[include]


def _seed_fewshot_per_document(task) -> None:
    """Give a standard task the per-document sampler (offline YAMLs carry it already)."""
    from lm_eval.api.samplers import ContextSampler

    from rt_lib.tasks.samplers import DocSeededSampler

    sampler = getattr(task, "sampler", None)
    if sampler is None or type(sampler) is not ContextSampler:  # first_n (MMLU) or already ours
        return
    new = DocSeededSampler(list(sampler.df), rnd=None, fewshot_indices=sampler.fewshot_indices)
    task.sampler = new
    original = task.fewshot_context

    def fewshot_context(doc, *args, **kwargs):
        new.current_doc = doc
        try:
            return original(doc, *args, **kwargs)
        finally:
            new.current_doc = None

    task.fewshot_context = fewshot_context


def _leaf_tasks(obj) -> list:
    from lm_eval.api.group import Group

    return list(obj.get_all_tasks()) if isinstance(obj, Group) else [obj]


def _collect(res: dict, harness_name: str, metrics: Sequence[str]) -> tuple[dict, dict, int]:
    """(metric -> (value, stderr), per-doc table, n) of one task/group from harness results."""
    r = res["results"][harness_name]
    values = {}
    for m in metrics:
        if f"{m},none" in r:
            values[m] = (_float(r[f"{m},none"]), _float(r.get(f"{m}_stderr,none")))
    keys, hashes, per_metric = [], [], defaultdict(list)
    for leaf in sorted(res.get("samples", {})):
        for s in sorted(res["samples"][leaf], key=lambda s: s["doc_id"]):
            keys.append([leaf, int(s["doc_id"])])
            hashes.append(s.get("prompt_hash"))
            for m in metrics:
                if m in s:
                    per_metric[m].append(float(s[m]))
    per_doc = {"keys": keys, "prompt_hash": hashes, **per_metric}
    for m, (v, se) in list(values.items()):
        xs = per_metric.get(m, [])
        if math.isnan(se) and len(xs) > 1:
            # the harness gives a group no stderr when a subtask has a single document (quick
            # MMLU); the group value is the mean over its documents, so use theirs
            mean = sum(xs) / len(xs)
            values[m] = (v, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs)))
    return values, per_doc, len(keys)


def evaluate(
    model_or_ms,
    tokenizer,
    preset: str = "quick",
    tasks: Sequence[str] | str | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    out_dir: str | os.PathLike | None = None,
    variant: str | None = None,
    dense_reference: "EvalResults | str | os.PathLike | bool | None" = None,
    *,
    seed: int = DEFAULT_SEEDS["fewshot_random_seed"],
    confidence: float = 0.95,
    interval: str = "t",
    model_name: str | None = None,
    **lm_kwargs,
) -> EvalResults:
    """Evaluate an in-memory model on a preset's tasks; see the module docstring.

    ``model_or_ms``: a dense HF causal LM or a ``MindSkipModel``. ``tasks``: a subset of the
    preset's (standard names). ``limit``: documents per task (MMLU: per subject); default the
    preset's. ``variant``: label of the model in the tables (default ``mindskip`` for a
    MindSkipModel, ``dense`` otherwise). ``dense_reference``: None -> for a MindSkipModel,
    also run it with every router forced to keep and pair with that; an ``EvalResults`` (or
    its path) from an earlier dense run of the same preset/tasks/limit/seed -> pair with it;
    False -> no dense run, no pairing. ``interval``: ``t`` or ``bootstrap``. Remaining
    keyword arguments go to ``MindSkipLM``/HFLM (e.g. ``max_length``).
    """
    import pandas as pd
    from lm_eval import simple_evaluate

    # --- every check before the harness starts
    p, names = check_request(preset, tasks, limit, batch_size)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if interval not in ("t", "bootstrap"):
        raise ValueError(f"interval must be 't' or 'bootstrap', got {interval!r}")
    is_ms = isinstance(model_or_ms, MindSkipModel)
    if not is_ms and not isinstance(model_or_ms, torch.nn.Module):
        raise ValueError(f"model_or_ms must be an HF model or a MindSkipModel, got {type(model_or_ms)}")
    if tokenizer is None:
        raise ValueError("pass the model's tokenizer")
    variant = variant or ("mindskip" if is_ms else "dense")
    limits = {t: (limit if limit is not None else p.limits.get(t)) for t in names}
    reference = None
    if isinstance(dense_reference, (str, os.PathLike)):
        dense_reference = EvalResults.load(dense_reference)
    if isinstance(dense_reference, EvalResults):
        reference = dense_reference
        if "dense" not in reference.per_doc:
            raise ValueError("dense_reference holds no 'dense' variant")
        if reference.preset != preset:
            raise ValueError(f"dense_reference was run with preset {reference.preset!r}, not {preset!r}")
        missing = [t for t in names if t not in reference.per_doc["dense"]]
        if missing:
            raise ValueError(f"dense_reference lacks tasks {missing}; evaluate the dense model on them first")
        for t in names:
            ref_t = reference.tasks[t]
            if ref_t["limit"] != limits[t] or ref_t["num_fewshot"] != p.shots[t]:
                raise ValueError(
                    f"dense_reference scored {t} with limit {ref_t['limit']} and {ref_t['num_fewshot']} shots, "
                    f"this run uses limit {limits[t]} and {p.shots[t]} shots: pass the same limit"
                )
        ref_seed = reference.provenance.get("seeds", {}).get("fewshot_random_seed")
        if ref_seed != seed:
            raise ValueError(f"dense_reference used fewshot seed {ref_seed}, this run {seed}: prompts would differ")
    run_dense_reference = variant != "dense" and dense_reference is None and is_ms
    if variant != "dense" and dense_reference is None and not is_ms:
        log.warning("variant %r is a plain model and no dense_reference was given: no paired differences", variant)

    ms = model_or_ms if is_ms else None
    tm = task_manager(p.offline)
    lm = MindSkipLM(pretrained=model_or_ms, tokenizer=tokenizer, batch_size=batch_size, **lm_kwargs)
    lm.skip_stats_per_task = False  # one task (or group) per harness call below
    model_name = model_name or lm.model_name
    ref_model = reference.provenance.get("model") if reference is not None else None
    if ref_model is not None and ref_model != model_name:
        raise ValueError(f"dense_reference was scored on model {ref_model!r}, this run evaluates {model_name!r}: "
                         "pair only runs of the same base model")

    task_info: dict[str, dict] = {}
    rows, paired_rows, skip_rows = [], [], []
    per_doc: dict[str, dict] = defaultdict(dict)
    wall: dict[str, dict[str, float]] = defaultdict(dict)
    harness_out: dict[str, dict] = defaultdict(dict)
    threshold = ms.config.threshold if ms is not None else None

    def run_one(label: str, task: str, obj, shots: int, lim, harness_name: str, metric_names):
        start = time.perf_counter()
        lm.reset_skip_counts()
        res = simple_evaluate(
            model=lm, tasks=[obj], num_fewshot=shots, limit=lim, batch_size=batch_size,
            log_samples=True, task_manager=tm, bootstrap_iters=1000, **_seeds(seed),
        )
        wall[label][task] = time.perf_counter() - start
        values, docs, n = _collect(res, harness_name, metric_names)
        per_doc[label][task] = docs
        harness_out[label][task] = {k: v for k, v in res.items() if k not in ("samples", "config")}
        return values, n

    def run_dense(task, *args):
        if ms is None:
            return run_one("dense", task, *args)
        saved = {i: g.forced for i, g in ms.gates.items()}
        ms.force(True)  # every router keeps: exactly the base model ...
        lm.mindskip = None  # ... through exactly HFLM's calls
        try:
            return run_one("dense", task, *args)
        finally:
            lm.mindskip = ms
            ms.force(saved)

    for task in names:
        spec = PAPER_TASKS[task]
        shots = p.shots[task]
        harness_name, obj = load_task(tm, p, task)
        metric_names = ["acc", "acc_norm"] if spec.metric == "acc_norm" else ["acc"]
        lim = limits[task]
        task_info[task] = {
            "harness_task": harness_name,
            "metric": spec.metric,
            "num_fewshot": shots,
            "limit": lim,
            "eval_split": spec.offline_split if p.offline else spec.standard_split,
            "fewshot_source": spec.fewshot_source(p.offline, shots),
            "leaf_tasks": [t.task_name for t in _leaf_tasks(obj)],
        }
        log.info("%s (%s): %d-shot, limit %s", task, harness_name, shots, lim)
        args = (obj, shots, lim, harness_name, metric_names)

        results_by_label = {}
        if variant == "dense" or run_dense_reference:
            results_by_label["dense"] = run_dense(task, *args)
        if variant != "dense":
            results_by_label[variant] = run_one(variant, task, *args)
            if ms is not None:
                for layer, frac in lm.skip_stats().items():
                    skip_rows.append({"variant": variant, "task": task, "layer": layer, "executed_fraction": frac})
                task_info[task]["skip_ratio"] = lm.skip_ratio()

        for label, (values, n) in results_by_label.items():
            for m, (v, se) in values.items():
                rows.append({
                    "variant": label, "task": task, "metric": m, "value": v, "stderr": se, "n": n,
                    "num_fewshot": shots, "threshold": threshold if label != "dense" else None,
                    "skip_ratio": task_info[task].get("skip_ratio") if (label != "dense" and ms is not None) else None,
                })

        ref_docs = None
        if "dense" in per_doc and task in per_doc["dense"]:
            ref_docs = per_doc["dense"][task]
        elif reference is not None:
            ref_docs = reference.per_doc["dense"][task]
        if ref_docs is not None and variant != "dense":
            var_docs = per_doc[variant][task]
            ref_hash = {tuple(k): h for k, h in zip(ref_docs["keys"], ref_docs["prompt_hash"])}
            bad = [tuple(k) for k, h in zip(var_docs["keys"], var_docs["prompt_hash"]) if ref_hash.get(tuple(k), h) != h]
            if bad:
                raise ValueError(
                    f"{task}: {len(bad)} documents were shown different prompts to the variant and the dense "
                    f"reference (e.g. {bad[:3]}); re-run the dense reference with the same preset, shots and seed"
                )
            for m in metric_names:
                if m not in var_docs or m not in ref_docs:
                    continue
                v = {tuple(k): s for k, s in zip(var_docs["keys"], var_docs[m])}
                r = {tuple(k): s for k, s in zip(ref_docs["keys"], ref_docs[m])}
                _, x, y = stats.pair_scores(v, r)
                pdiff = stats.paired_difference(x, y, confidence=confidence, method=interval, seed=seed)
                paired_rows.append({"variant": variant, "task": task, "metric": m, "diff": pdiff.diff,
                                    "ci_low": pdiff.ci_low, "ci_high": pdiff.ci_high, "n": pdiff.n,
                                    "confidence": confidence, "se": pdiff.se, "method": pdiff.method})

    # --- macro averages over the tasks' paper metrics
    table = pd.DataFrame(rows, columns=RESULT_COLUMNS).astype({"n": "Int64", "num_fewshot": "Int64"})
    for label in dict.fromkeys(table.variant):
        sel = [table[(table.variant == label) & (table.task == t) & (table.metric == task_info[t]["metric"])] for t in names]
        sel = [s.iloc[0] for s in sel if len(s)]
        if len(sel) == len(names) and len(names) > 1:
            skips = [s.skip_ratio for s in sel if s.skip_ratio is not None and s.skip_ratio == s.skip_ratio]
            table.loc[len(table)] = {
                "variant": label, "task": MACRO, "metric": "paper", "value": sum(s.value for s in sel) / len(sel),
                "stderr": stats.macro_stderr([s.stderr for s in sel]), "n": int(sum(s.n for s in sel)),
                "num_fewshot": None, "threshold": threshold if label != "dense" else None,
                "skip_ratio": (sum(skips) / len(skips)) if skips else None,
            }
    paired = pd.DataFrame(paired_rows)
    if len(paired):
        parts = []
        for t in names:
            s = paired[(paired.task == t) & (paired.metric == task_info[t]["metric"])]
            if len(s):
                r = s.iloc[0]
                parts.append(stats.PairedDifference(r["diff"], r.ci_low, r.ci_high, int(r.n), r.se, confidence, r.method))
        if len(parts) == len(names) and len(names) > 1:
            m = stats.macro_difference(parts, confidence)
            paired.loc[len(paired)] = {"variant": variant, "task": MACRO, "metric": "paper", "diff": m.diff,
                                       "ci_low": m.ci_low, "ci_high": m.ci_high, "n": m.n, "confidence": confidence,
                                       "se": m.se, "method": m.method}
    else:
        paired = pd.DataFrame(columns=PAIRED_COLUMNS)
    skip_frame = pd.DataFrame(skip_rows, columns=SKIP_COLUMNS)

    prov = _provenance(lm, ms, model_name, preset, p, names, limits, batch_size, seed, variant, confidence, interval, task_info)
    result = EvalResults(preset, table, paired, skip_frame, dict(per_doc), task_info, prov, dict(wall), dict(harness_out))
    if out_dir is not None:
        result.save(out_dir)
    return result


def load_task(tm, p: Preset, task: str) -> tuple[str, Any]:
    """The harness task (or group) of a preset's standard task name, ready to evaluate: the
    standard tasks get the per-document few-shot sampler (the offline ones have it built in)."""
    harness_name = p.harness_task(task)
    loaded = tm.load([harness_name])
    obj = loaded["groups"].get(harness_name) or loaded["tasks"][harness_name]
    if not p.offline:
        for leaf in _leaf_tasks(obj):
            _seed_fewshot_per_document(leaf)
    return harness_name, obj


def _seeds(fewshot_seed: int) -> dict:
    return {**DEFAULT_SEEDS, "fewshot_random_seed": fewshot_seed}


def _provenance(lm, ms, model_name, preset, p, names, limits, batch_size, seed, variant, confidence, interval, task_info) -> dict:
    import lm_eval

    from rt_lib import runs

    prov = runs.provenance()
    model = lm._model
    prov.update({
        "model": model_name,
        "model_source": getattr(model.config, "rt_kit_source", None),
        "model_dtype": str(next(model.parameters()).dtype),
        "preset": preset,
        "preset_description": p.description,
        "harness": "lm-evaluation-harness",
        "harness_version": getattr(lm_eval, "__version__", None) or runs._version("lm_eval"),
        "seeds": _seeds(seed),
        "fewshot_sampler": "rt_lib.tasks.samplers.DocSeededSampler (per document); MMLU: first_n",
        "batch_size": batch_size,
        "variant": variant,
        "confidence": confidence,
        "interval": interval,
        "fewshot_source": {t: task_info[t]["fewshot_source"] for t in names},
        "parameters": {"tasks": list(names), "limits": limits, "batch_size": batch_size, "seed": seed},
    })
    if ms is not None:
        forced = {str(i): (g.forced if isinstance(g.forced, (bool, type(None))) else "per-row tensor")
                  for i, g in ms.gates.items()}
        prov["mindskip"] = {
            "routers_sha256": getattr(lm, "routers_path", None) and _file_sha256(Path(lm.routers_path) / "routers.safetensors"),
            "router_weights_sha256": routers_sha256(ms),
            "threshold": ms.config.threshold,
            "routed_layers": list(ms.routed_layers),
            "config": ms.config.to_dict(),
            "forced": forced if any(v is not None for v in forced.values()) else None,
        }
    return prov


# ------------------------------------------------------------------------- command line
def _main_preset(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rt_lib.evaluation preset",
                                 description="Run a kit preset and write <out>/eval/ (docs/results_format.md).")
    ap.add_argument("--pretrained", default="smollm2-135m-instruct")
    ap.add_argument("--routers", default=None, help="router checkpoint folder")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--force-skip", default=None,
                    help="comma-separated layers whose attention is skipped for every input, added to the "
                         "default routed layers whose zero-initialised routers keep everything (hand-set routing)")
    ap.add_argument("--preset", default="quick", choices=list(PRESETS))
    ap.add_argument("--tasks", default=None)
    ap.add_argument("--limit", type=float, default=None)
    ap.add_argument("--batch-size", default="1")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEEDS["fewshot_random_seed"])
    ap.add_argument("--out", default=None, help="run folder (results/runs/<id>)")
    a = ap.parse_args(argv)
    limit = None if a.limit is None else (int(a.limit) if float(a.limit).is_integer() else a.limit)
    bs = a.batch_size if a.batch_size.startswith("auto") else int(a.batch_size)
    check_request(a.preset, a.tasks, limit, bs)
    if a.routers and a.force_skip:
        raise SystemExit("--routers and --force-skip are exclusive")
    from rt_lib import assets

    model, tok = assets.load_model(a.pretrained, dtype=a.dtype, device=_pick_device(a.device))
    target = model
    if a.routers:
        target = load_routers(model, a.routers)
        if a.threshold is not None:
            target.set_threshold(a.threshold)
    elif a.force_skip:
        # hand-set routing: the default routed layers (zero-initialised routers keep everything)
        # plus the given ones, whose attention is skipped for every input
        from rt_lib.config import MindSkipConfig
        from rt_lib.mindskip import get_mindskip_model, routed_layers_for

        skip = sorted({int(x) for x in a.force_skip.split(",") if x.strip()})
        cfg = MindSkipConfig()
        cfg.routed_layers = sorted(set(routed_layers_for(model, cfg)) | set(skip))
        target = get_mindskip_model(model, cfg)
        target.force({layer: False for layer in skip})
    t0 = time.perf_counter()
    res = evaluate(target, tok, preset=a.preset, tasks=a.tasks, limit=limit, batch_size=bs, out_dir=a.out,
                   seed=a.seed, model_name=a.pretrained)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(res.summary().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wall time {time.perf_counter() - t0:.1f} s" + (f"; files in {Path(a.out) / 'eval'}" if a.out else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tasks"]:
        import argparse

        ap = argparse.ArgumentParser(prog="python -m rt_lib.evaluation tasks",
                                     description="Write the kit's offline task YAMLs (for lm_eval --include_path).")
        ap.add_argument("--out", default=None)
        a = ap.parse_args(argv[1:])
        print(write_offline_tasks(a.out))
        return 0
    if argv[:1] == ["preset"]:
        return _main_preset(argv[1:])
    # the harness's own CLI, with `mindskip` registered (by this import) and offline tasks included.
    # The harness checks task names before loading the model, but not a limit that scores nothing.
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--limit" and i + 1 < len(argv) else (arg[8:] if arg.startswith("--limit=") else None)
        if value is not None:
            try:
                bad = float(value) <= 0
            except ValueError:
                bad = False  # the harness reports a malformed number itself
            if bad:
                raise ValueError(f"--limit {value} would score no documents; omit it for all, or give a positive number")
    if "--tasks" in argv and "--include_path" not in argv:
        argv += ["--include_path", str(write_offline_tasks())]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

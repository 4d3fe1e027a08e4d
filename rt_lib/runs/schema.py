"""Every column and main JSON field the kit writes into a run folder and into results/tables.

One declaration per file kind: its columns in the order the writer puts them, each with a
one-line meaning and how ``rt_lib.runs.read`` checks it when reading. docs/results_format.md
shows these declarations as tables; its tables are generated here (``render_doc``) and a
test keeps the committed page equal to the generated text:

    python -m rt_lib schema docs/results_format.md     # rewrite the generated tables in place

A column is ``written`` when the kit's writer puts it in every file of its kind, and
``required`` when a run folder lacking it is left out by the reader. ``threshold`` in
paired/skip_stats/profile files is neither: a threshold sweep adds it and the reader uses it
when present. ``numeric`` columns are read as floats (a non-numeric value leaves the run
out); ``fraction`` columns must lie in [0, 1] (a percent written by mistake must not pass).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    """One CSV column (or a family of columns, ``pattern``, e.g. ``capacity_L<i>``)."""

    name: str
    meaning: str
    numeric: bool = False
    fraction: bool = False
    required: bool = True
    written: bool = True
    pattern: str | None = None  # regular expression for a family of columns; ``name`` shows it


@dataclass(frozen=True)
class FileKind:
    """One kind of CSV file: where it lies, who writes it, its columns in order."""

    path: str  # relative to a run folder, or ``tables/<name>.csv`` under the results folder
    writer: str
    columns: tuple[Column, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


@dataclass(frozen=True)
class Field:
    """One top-level field of a JSON file."""

    name: str
    meaning: str
    always: bool = True  # False: only some files have it


def _c(name: str, meaning: str, **kw) -> Column:
    return Column(name, meaning, **kw)


THRESHOLD_OPTIONAL = _c("threshold", "router threshold of the row; only in files of a threshold sweep (empty for "
                        "variants without routers)", numeric=True, required=False, written=False)

EVAL_RESULTS = FileKind("eval/results.csv", "rt_lib.evaluation.driver", (
    _c("variant", "the variant's name: `dense`, `mindskip`, or a caller's label (`mindskip_t<threshold>`, "
       "`static_drop_k<k>`); a name only: what the variant is, is in `method`, `k` and `threshold`"),
    _c("method", "`dense`, `mindskip`, `static_drop`, or a caller's method (e.g. `lora`); files written before "
       "this column existed get it from their labels when read", required=False),
    _c("k", "layers a static drop removes, or the skipped-layer target of a MindSkip operating point; empty "
       "otherwise", numeric=True, required=False),
    _c("task", "harness task name; `macro_avg` is the unweighted mean over the tasks"),
    _c("metric", "harness metric (`acc`, `acc_norm`, ...)"),
    _c("value", "score; a fraction in [0, 1] for accuracies", numeric=True, fraction=True),
    _c("stderr", "harness standard error of `value`", numeric=True),
    _c("n", "documents scored"),
    _c("num_fewshot", "few-shot examples per prompt"),
    _c("threshold", "router threshold the variant ran at (empty for variants without routers)", numeric=True),
    _c("skip_ratio", "the paper's skip ratio on the task: skipped sublayer executions / all layers' executions, "
       "i.e. layers skipped per sequence / the model's layers (MindSkip: realised by its gates; static drop: k / "
       "layers; empty for `dense`); files written before run.json recorded `skip_ratio_of` hold fractions of "
       "the routed layers and are converted when read", numeric=True, fraction=True),
))
EVAL_PAIRED = FileKind("eval/paired.csv", "rt_lib.evaluation.driver", (
    _c("variant", "variant compared with `dense`"),
    THRESHOLD_OPTIONAL,
    _c("task", "harness task name (`macro_avg`: combined over tasks)"),
    _c("metric", "harness metric"),
    _c("diff", "mean per-document difference variant - dense (fraction)", numeric=True),
    _c("ci_low", "lower end of the interval of `diff`", numeric=True),
    _c("ci_high", "upper end of the interval of `diff`", numeric=True),
    _c("n", "paired documents"),
    _c("confidence", "confidence level of the interval"),
))
EVAL_SKIP_STATS = FileKind("eval/skip_stats.csv", "rt_lib.evaluation.driver", (
    _c("variant", "routed variant"),
    THRESHOLD_OPTIONAL,
    _c("task", "harness task name"),
    _c("layer", "routed layer index", numeric=True),
    _c("executed_fraction", "fraction of that layer's routed sublayer executions that ran", numeric=True,
       fraction=True),
))
PROFILE = FileKind("profile/profile.csv", "rt_lib.speed.profiling", (
    _c("regime", "`prefill` or `decode`"),
    _c("variant", "`dense`, `mindskip`, `mindskip_forced`, `oracle`, `mask` or `static_drop`"),
    THRESHOLD_OPTIONAL,
    _c("batch_size", "sequences per batch"),
    _c("seq_len", "prompt length (prefill) or context length (decode)"),
    _c("new_tokens", "tokens generated per timed decode call"),
    _c("median_ms", "median latency in milliseconds"),
    _c("p10_ms", "10th percentile latency in milliseconds"),
    _c("p90_ms", "90th percentile latency in milliseconds"),
    _c("tokens_per_s", "throughput"),
    _c("skip_ratio", "realised skip ratio (gates) or removed / routed layers (`oracle`, `static_drop`)",
       numeric=True, fraction=True),
    _c("kv_bytes", "KV cache bytes held after prefill or after the timed decode steps"),
    _c("speedup", "dense median / variant median, same run", numeric=True),
    _c("bound_speedup", "upper bound measured at this grid point: dense time / (dense time - the dense model's "
       "hooked time of the sublayers this variant skips); empty in files written before it was measured",
       numeric=True),
    _c("roofline_speedup", "analytic roofline estimate for the same skipped sublayers (not a bound)", numeric=True,
       required=False),
    _c("status", "`ok` or `skipped`"),
    _c("reason", "why a grid point was skipped"),
))
TRAIN_LOG = FileKind("train/log.csv", "rt_lib.tuning.train", (
    _c("step", "optimiser step (1-based)", numeric=True),
    _c("loss", "total loss: LM loss + capacity regulariser", numeric=True),
    _c("lm_loss", "language-modelling loss", numeric=True),
    _c("reg_loss", "capacity regulariser λ · Σ ReLU(capacity_l - s)", numeric=True),
    _c("lr", "learning rate of the step"),
    _c("capacity_target", "the regulariser's target s at that step (`target_anneal`: falling from 1.0); absent in "
       "logs written before it was recorded", required=False, written=False),
    _c("mean_capacity", "executed fraction averaged over routed layers", numeric=True),
    _c("capacity_L<i>", "executed fraction of routed layer `i` (one column per routed layer)", required=False,
       pattern=r"capacity_L\d+"),
    _c("tokens", "tokens seen so far (cumulative)", required=False),
    _c("elapsed_s", "seconds since training started", required=False),
))
EXPERT_LOAD = FileKind("moe/expert_load.csv", "rt_lib.speed.moe_load", (
    _c("layer", "MoE layer index", numeric=True),
    _c("expert", "expert index within the layer's sparse block", numeric=True),
    _c("routed", "whether a MindSkip router gates the layer's block"),
    _c("assigned", "real tokens the expert router assigns to the expert with nothing skipped (the dense pass; a "
       "token counts once for each of its top-k experts)", numeric=True),
    _c("routed_assigned", "what the expert router assigns on the MindSkip pass's own inputs, skipped tokens "
       "included", numeric=True),
    _c("executed", "tokens that reach the expert under MindSkip", numeric=True),
))
RUN_FILES = (EVAL_RESULTS, EVAL_PAIRED, EVAL_SKIP_STATS, PROFILE, TRAIN_LOG, EXPERT_LOAD)

TIDY_RUNS = FileKind("tables/runs.csv", "rt_lib.paper.build", (
    _c("run_id", "run folder's id (run.json `run_id`)"),
    _c("model", "printed model name"),
    _c("dataset", "tuning data of the run"),
    _c("variant", "eval/results.csv variant"),
    _c("method", "`dense`, `mindskip`, `static_drop`, `lora`, `lora+mindskip` (published rows: the paper's "
       "baseline, Router-Tuning and attention drop under these names)"),
    _c("granularity", "routed sublayer (`attn`, `mlp`, `block`); routed and static-drop rows only"),
    _c("route_level", "`seq` or `token`; routed rows only"),
    _c("threshold", "eval/results.csv threshold"),
    _c("task", "the paper's task column name (`arc_c`, `obqa`, ...)"),
    _c("task_name", "task name as the harness wrote it"),
    _c("metric", "harness metric"),
    _c("value", "score (fraction)"),
    _c("stderr", "standard error of `value`"),
    _c("n", "documents scored"),
    _c("num_fewshot", "few-shot examples per prompt"),
    _c("skip_ratio", "realised skip ratio, of all layers (eval/results.csv)"),
    _c("speedup", "median speedup over the run's profile grid at this operating point (empty: not profiled)"),
    _c("diff", "paired difference to dense from eval/paired.csv"),
    _c("ci_low", "lower end of the interval of `diff`"),
    _c("ci_high", "upper end of the interval of `diff`"),
    _c("created", "run.json `created`"),
))
SWEEP_TABLE = FileKind("tables/router_tuning_sweep_cpu.csv", "rt_lib.tuning.train.sweep_table", (
    _c("run", "run folder name"),
    _c("lr", "peak learning rate"),
    _c("reg_lambda", "weight λ of the capacity regulariser"),
    _c("capacity_target", "target capacity s"),
    _c("steps", "optimiser steps run"),
    _c("batch_size", "global batch size"),
    _c("max_length", "tokens per sequence"),
    _c("train_capacity_min", "lowest mean capacity over the log"),
    _c("train_capacity_last", "mean capacity at the last step"),
    _c("heldout_capacity", "mean executed fraction on held-out text"),
    _c("layers_always_skipped", "routed layers with held-out capacity 0"),
    _c("layers_always_kept", "routed layers with held-out capacity 1"),
    _c("heldout_loss_dense", "held-out LM loss of the dense model"),
    _c("heldout_loss_tuned", "held-out LM loss with the routers"),
    _c("heldout_loss_increase", "tuned - dense held-out loss"),
    _c("router_margin", "mean |r - threshold| on held-out text"),
    _c("router_weight_norm", "mean L2 norm of the router weights"),
    _c("wall_time_s", "training wall time in seconds"),
))
PAPER_TABLE = FileKind("tables/<table>.csv", "rt_lib.paper.build", (
    _c("source", "`paper` (results/reference) or `kit`"),
    _c("run_id", "kit run id (empty for paper rows)"),
    _c("model", "printed model name"),
    _c("method / data", "method (main and LoRA tables) or tuning data (data ablation)"),
    _c("granularity, route_level", "main table only"),
    _c("threshold", "router threshold the row was evaluated at (main and LoRA tables)"),
    _c("row", "`score`, `diff_dense` (Δ vs dense) or `diff_paper` (Δ vs paper)"),
    _c("speedup", "speedup over dense (not in the data ablation)"),
    _c("<task>", "one column per task: percent, or points for Δ rows; `not run` where nothing was measured",
       pattern=r".+"),
    _c("avg", "mean over the paper's task columns the row has"),
    _c("avg_tasks", "how many task columns `avg` averages"),
))
TABLE_FILES = (TIDY_RUNS, SWEEP_TABLE, PAPER_TABLE)
FILES = {kind.path: kind for kind in (*RUN_FILES, *TABLE_FILES)}

# Fields the kit wrote under another name before (old -> name now), by step: the training recipe,
# the evaluation's task set and the profile's grid were all called ``preset``. Readers take both:
# ``rt_lib.runs.read.upgrade`` (run.json ``parameters.<step>``), ``rt_lib.tuning.config.upgrade_config``
# (training options of summaries and checkpoints), ``EvalResults.load`` (eval/results.json).
RENAMED_FIELDS: dict[str, dict[str, str]] = {
    "train": {"preset": "recipe"},
    "eval": {"preset": "task_set"},
    "profile": {"preset": "grid"},
}

# The main JSON fields, by file. Nested fields are described in docs/results_format.md prose.
JSON_FIELDS: dict[str, tuple[Field, ...]] = {
    "run.json": (
        Field("run_id", "the run's id (the folder name unless given)"),
        Field("created", "UTC time the folder was made"),
        Field("preset", "pipeline preset the run was made with (`notebooks/presets/<name>.json`); empty for a run "
                        "made outside the pipeline (older such runs: the recipe, task set or grid they ran)"),
        Field("parameters", "every option each step ran with, one object per step (`parameters.<step>`, below)"),
        Field("versions", "python, torch, transformers, lm_eval, rt_lib versions"),
        Field("extra_versions", "versions of further packages"),
        Field("git_revision", "commit of the kit's checkout"),
        Field("git_dirty", "uncommitted changes in the checkout"),
        Field("device", "`cpu` or `cuda:<name>`"),
        Field("threads", "torch CPU threads"),
        Field("platform", "operating system"),
        Field("cpu_count", "logical CPUs"),
        Field("python_executable", "interpreter path"),
        Field("steps", "one entry per step: what it did (files, result summaries) plus status, times, inputs (below)"),
        Field("history", "earlier records of a folder that was made again", always=False),
        Field("replacements", "one entry per step folder moved aside by `--replace`", always=False),
        Field("notes", "free text added by hand", always=False),
    ),
    "train/summary.json": (
        Field("recipe", "training recipe (`rt_lib/tuning/recipes/<name>.json`)", always=False),
        Field("preset", "the training recipe, in files written before it was called so", always=False),
        Field("finished", "false when stopped early by `stop_after`"),
        Field("steps", "optimiser steps done"),
        Field("total_steps", "optimiser steps of the full schedule"),
        Field("wall_time_s", "training time in seconds"),
        Field("total_time_s", "time including setup and held-out evaluation"),
        Field("peak_memory_mb", "peak memory in MiB"),
        Field("peak_memory_kind", "what `peak_memory_mb` measures (CUDA allocator or process RSS)"),
        Field("final_capacity", "`{layer: executed fraction}` on held-out text in eval mode"),
        Field("final_capacity_source", "how `final_capacity` was measured"),
        Field("final_train_capacity", "`{layer: capacity}` at the last training step"),
        Field("heldout_router_margin", "`{layer: mean |r - threshold|}` on held-out text"),
        Field("router_weight_norm", "`{layer: L2 norm of the router weight}`"),
        Field("heldout_lm_loss", "`{\"dense\": x, \"tuned\": y}` held-out LM loss"),
        Field("heldout_skip_ratio", "mean over layers of 1 - `final_capacity`"),
        Field("config", "the MindSkip config (resolved `routed_layers`)"),
        Field("routed_layers", "routed layer indices"),
        Field("trainable", "`routers`, `lora` or `full`"),
        Field("trainable_parameters", "number of tuned parameters"),
        Field("precision", "`fp32` or `bf16`"),
        Field("backbone_dtype", "dtype the frozen backbone ran in (`float32`, `bfloat16`: `model_dtype` resolved; runs before this field: float32 unless `train_config.model_dtype` says otherwise)", always=False),
        Field("processes", "data-parallel processes"),
        Field("gradient_accumulation", "micro-batches per optimiser step"),
        Field("warmup_steps", "linear warm-up steps"),
        Field("data", "selection statistics of the tuning data"),
        Field("heldout_data", "selection statistics of the held-out data"),
        Field("train_config", "every training option"),
    ),
    "eval/results.json": (
        Field("task_set", "task set scored (`rt_lib.evaluation.tasks.TASK_SETS`)", always=False),
        Field("preset", "the task set, in files written before it was called so", always=False),
        Field("provenance", "model, router checkpoint, harness version, seeds, batch size, fewshot source, "
                            "`parameters`, `mindskip` (the routers' config), `num_layers` (the model's layers) and "
                            "`skip_ratio_of` (`all layers`: the unit of the skip ratios; absent in files written when "
                            "they were of the routed layers)"),
        Field("tasks", "the tasks and their settings"),
        Field("results", "the rows of eval/results.csv"),
        Field("paired", "the rows of eval/paired.csv"),
        Field("skip_stats", "the rows of eval/skip_stats.csv"),
        Field("wall_time_s", "`{variant: {task: seconds}}`"),
        Field("per_doc", "per-document records, for pairing, per variant and task: `keys`, `prompt_hash`, one score "
                         "list per metric and, for multiple-choice tasks, `gold`, `pred`, `pred_norm`, `ll_gold`, "
                         "`ll_gold_norm`, `ll_choices` (every choice's log-likelihood, nats) and `choice_chars` (the "
                         "characters acc_norm divides each by); files written before the last two existed lack them"),
        Field("harness", "the harness's own result objects"),
    ),
    "profile/profile.json": (
        Field("device_name", "device the timings ran on"),
        Field("dtype", "model dtype"),
        Field("threads", "torch CPU threads"),
        Field("load_average", "1/5/15-min load before and after"),
        Field("timing", "clock used"),
        Field("interleaving", "order in which variants were timed"),
        Field("warmup", "warm-up rounds"),
        Field("repeats", "timed rounds"),
        Field("routed_layers", "routed layer indices"),
        Field("skip_layers", "layers skipped by `mindskip_forced`, `oracle` and `mask`"),
        Field("static_layers", "layers removed by `static_drop`"),
        Field("omitted", "`{variant: reason}`: variants asked for that did not run (`static_drop` for `moe` routers "
                         "or without a layer list)", always=False),
        Field("prompts", "what the timed prompts were"),
        Field("threshold", "router threshold of the `mindskip` rows"),
        Field("roofline", "peak FLOP/s and bandwidth of the roofline estimate"),
        Field("bound_curves", "roofline estimate per grid point and skip ratio"),
        Field("granularity", "routed sublayer", always=False),
        Field("settings", "the profiling settings"),
        Field("versions", "package versions"),
        Field("extra_versions", "versions of further packages"),
        Field("git_revision", "commit of the kit's checkout"),
        Field("git_dirty", "uncommitted changes in the checkout"),
        Field("device", "`cpu` or `cuda:<name>`"),
        Field("platform", "operating system"),
        Field("cpu_count", "logical CPUs"),
        Field("python_executable", "interpreter path"),
        Field("measurements", "every timed repeat"),
        Field("sublayer_times", "per grid point, the dense model's hooked time per sublayer behind `bound_speedup`",
              always=False),
        Field("wall_time_s", "profiling time in seconds"),
        Field("grid", "profiling grid (`rt_lib.speed.profiling.PROFILE_GRIDS`)", always=False),
        Field("preset", "the profiling grid, in files written before it was called so", always=False),
        Field("model", "model profiled"),
        Field("routers", "router checkpoint path, sha256 and config"),
        Field("text", "text the prompts were cut from"),
    ),
    "baselines/static_drop.json": (
        Field("method", "how layers were chosen"),
        Field("k", "layers dropped"),
        Field("layers", "the dropped layers"),
        Field("candidates", "layers that could be dropped"),
        Field("scores", "`{layer: importance}`, 1 - cos(h_in, h_out)"),
        Field("calibration", "calibration data used for the scores"),
    ),
}


# ---------------------------------------------------------------------------- checks used by the reader
def required_columns(path: str) -> list[str]:
    """Columns a file of kind ``path`` must have to be read."""
    return [c.name for c in FILES[path].columns if c.required and c.pattern is None]


def numeric_columns(path: str) -> list[str]:
    """Columns read as floats."""
    return [c.name for c in FILES[path].columns if c.numeric]


def fraction_columns(path: str) -> list[str]:
    """Columns that must lie in [0, 1]."""
    return [c.name for c in FILES[path].columns if c.fraction]


def header_matches(path: str, header: list[str]) -> bool:
    """Whether ``header`` is what the writer of ``path`` writes: the written columns in order,
    a pattern column standing for one or more matching names, unwritten optional columns allowed
    where declared."""
    i = 0
    for col in FILES[path].columns:
        if col.pattern is not None:
            j = i
            while j < len(header) and re.fullmatch(col.pattern, header[j]):
                j += 1
            if j == i and col.required:
                return False
            i = j
        elif i < len(header) and header[i] == col.name:
            i += 1
        elif col.written:
            return False
    return i == len(header)


# ---------------------------------------------------------------------------- the doc's tables
BEGIN = "<!-- generated: {key} (python -m rt_lib schema) -->"
END = "<!-- end generated -->"
_BLOCK = re.compile(r"<!-- generated: (?P<key>\S+) \(python -m rt_lib schema\) -->\n.*?<!-- end generated -->",
                    re.DOTALL)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _flags(c: Column) -> str:
    parts = []
    if c.fraction:
        parts.append("fraction")
    elif c.numeric:
        parts.append("number")
    if not c.written:
        parts.append("optional")
    elif not c.required:
        parts.append("not checked")
    return ", ".join(parts)


def column_table(path: str) -> str:
    """Markdown table of one file kind's columns, in the order they are written."""
    lines = ["| column | meaning | read as |", "|---|---|---|"]
    lines += [f"| `{c.name}` | {_cell(c.meaning)} | {_flags(c)} |" for c in FILES[path].columns]
    return "\n".join(lines)


def field_table(path: str) -> str:
    """Markdown table of one JSON file's top-level fields."""
    lines = ["| field | meaning |", "|---|---|"]
    lines += [f"| `{f.name}` | {_cell(f.meaning)}{'' if f.always else ' (some files)'} |" for f in JSON_FIELDS[path]]
    return "\n".join(lines)


# Where ``rt_lib.runs.read.setting`` looks, in order; the first source holding the key (with a value
# other than None or "") answers. Every step records its options in ``parameters.<step>``; folders
# written before that are read through ``rt_lib.runs.read.upgrade``, which moves their older records there.
SETTING_SOURCES = (
    ("the MindSkip config: run.json `steps.train.config` (resolved by training), else "
     "`parameters.eval.mindskip` (the routers an evaluation-only run scored)"),
    ("run.json `parameters.<step>`: every option the step ran with; steps in the order "
     "train, eval, profile, pipeline, then any other"),
)


def setting_sources_list() -> str:
    """Numbered list of the sources ``rt_lib.runs.read.setting`` searches, in order."""
    return "\n".join(f"{i}. {source}" for i, source in enumerate(SETTING_SOURCES, 1))


SETTING_SOURCES_KEY = "setting-sources"
DOC_KEYS = (*FILES, *JSON_FIELDS, SETTING_SOURCES_KEY)  # every block docs/results_format.md holds


def generated_block(key: str) -> str:
    """The generated text for one docs block, markers included."""
    if key in FILES:
        body = column_table(key)
    elif key in JSON_FIELDS:
        body = field_table(key)
    elif key == SETTING_SOURCES_KEY:
        body = setting_sources_list()
    else:
        raise KeyError(f"docs block names {key!r}, which rt_lib.runs.schema does not declare; known: {', '.join(DOC_KEYS)}")
    return f"{BEGIN.format(key=key)}\n{body}\n{END}"


def doc_keys(text: str) -> list[str]:
    """The file kinds whose tables a page holds, in order."""
    return [m.group("key") for m in _BLOCK.finditer(text)]


def render_doc(text: str) -> str:
    """``text`` with every generated block replaced by the current declaration."""
    return _BLOCK.sub(lambda m: generated_block(m.group("key")), text)

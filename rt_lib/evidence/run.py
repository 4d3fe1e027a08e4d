"""The evidence run: enough documents, at the paper's operating points, to decide its claims.

    python -m rt_lib evidence --out results/runs/evidence-cpu \\
        --routers results/runs/cpu-main/train/routers

What it scores (every variant on the same documents and prompts, paired with dense):

* ``dense``: the base model;
* ``mindskip_k4``, ``mindskip_k8``: the routers at the thresholds that skip on average 4 and
  8 attention sublayers per sequence on held-out text: 13.3% and 26.7% of the embedded
  model's 30 layers, the paper's 12.5% and 25% of all layers (its Figure 2) rounded to whole
  layers (on the tasks the realised skip differs: ``measures.csv``). The threshold is found by bisection on ``calibration`` blocks of the Wikipedia
  validation text (no task document, no label), because one tuning then serves every
  operating point and the comparison isolates how many layers are skipped
  (``bisection_steps`` evaluations, or fewer: ``calibration_tolerance``, see
  ``calibrate_threshold``);
* ``static_drop_k<k>``: static attention drop of ``k`` layers, ``k`` = MindSkip's realised
  skipped layers on the tasks (macro average), rounded, for each MindSkip operating point; the
  layers' importance is scored on ``static_drop_samples`` packed 256-token blocks of the
  Wikipedia training text (``rt_lib.tuning.baselines.attention_importance``);
* ``mindskip_t<τ>``: the routers at their own threshold (the ``cpu`` recipe's operating point).

Each (variant, task) is one part written atomically under ``<out>/evidence/parts/``; a run
that is interrupted continues with the first missing part (calibration and static-drop
scores are files too). When every part is there the parts are combined into ``<out>/eval/``
(the usual results files) and ``<out>/evidence/measures.csv`` (``rt_lib.evaluation.measures``).

Held-out LM loss (``<out>/evidence/heldout.csv``): every variant above plus, for the
granularity and routing-level claims, the routers of ``--compare`` run folders calibrated to
the same skipped-layer count, each scored on the same ``heldout`` Wikipedia validation
blocks (disjoint from the calibration blocks), per block, so differences are paired.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rt_lib import files
from rt_lib.evidence.calibration import BISECTION_STEPS, calibrate_threshold
from rt_lib.runs import record as runs

log = logging.getLogger(__name__)

TARGET_LAYERS = (4, 8)  # skipped attention sublayers per sequence (of the model's layers)
TASK_SET = "evidence"  # rt_lib.evaluation.tasks.TASK_SETS
CALIBRATION_BLOCKS = 32  # Wikipedia validation blocks for the threshold bisection
HELDOUT_BLOCKS = 128  # further validation blocks for the paired held-out loss
BLOCK_TOKENS = 256
STATIC_DROP_SAMPLES = 64  # Wikipedia training blocks scoring the static drop's attention importance


# ------------------------------------------------------------------------- text blocks
def wiki_blocks(tokenizer, n: int, skip: int = 0) -> list[dict]:
    """``n`` packed ``BLOCK_TOKENS``-token blocks of the embedded Wikipedia validation text,
    after the first ``skip`` (so calibration and held-out blocks never overlap)."""
    from rt_lib.tuning.data import build_dataset

    blocks, _ = build_dataset(tokenizer, "wikipedia-en", split="validation", num_samples=skip + n,
                              max_length=BLOCK_TOKENS, packing=True, format="text", seed=0)
    if len(blocks) < skip + n:
        raise ValueError(f"the Wikipedia validation text gives {len(blocks)} blocks of {BLOCK_TOKENS} tokens, "
                         f"fewer than the {skip + n} asked for")
    return blocks[skip:skip + n]


@torch.no_grad()
def score_blocks(model, blocks: list[dict], pad_id: int, batch_size: int = 8, ms=None) -> dict:
    """Per-block mean next-token loss, and with ``ms`` (a MindSkipModel under sequence routing)
    the per-block keep decision of every routed layer (``keep[b][j]`` for ``ms.routed_layers[j]``)."""
    from rt_lib.tuning.data import IGNORE_INDEX, collate

    losses: list[float] = []
    keep: list[list[bool]] = []
    for i in range(0, len(blocks), batch_size):
        batch = collate(blocks[i:i + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                               reduction="none")
        n = (labels != IGNORE_INDEX).sum(1).clamp_min(1)
        losses += (ce.sum(1) / n).tolist()
        if ms is not None:
            dec = ms.decisions()
            cols = [dec[j].reshape(len(ce), -1).all(1) if dec[j] is not None else torch.ones(len(ce), dtype=torch.bool)
                    for j in ms.routed_layers]
            keep += torch.stack(cols, 1).tolist()
    return {"losses": losses, "keep": keep}


def block_losses(model, blocks: list[dict], pad_id: int, batch_size: int = 8) -> list[float]:
    """Mean next-token cross-entropy of each block (the unit of the paired held-out loss)."""
    return score_blocks(model, blocks, pad_id, batch_size)["losses"]


# ------------------------------------------------------------------------- the run
class ModelHolder:
    """The base model and tokenizer of a study, loaded on first use (``model_name``, ``dtype``)."""

    model_name: str
    dtype: str
    _base = _tok = None

    @property
    def base(self):
        if self._base is None:
            from rt_lib.assets.loading import load_model

            self._base, self._tok = load_model(self.model_name, dtype=self.dtype)
        return self._base

    @property
    def tok(self):
        self.base
        return self._tok

    def pad_id(self) -> int:
        from rt_lib.tuning.data import pad_token_id

        return pad_token_id(self.tok)


class Evidence(ModelHolder):
    """One evidence run folder; every step is a file, present parts are never recomputed."""

    def __init__(self, out: str | os.PathLike, routers: str | os.PathLike, *, model: str | None = None,
                 dtype: str = "auto", tasks: Sequence[str] | None = None, batch_size: int = 8,
                 targets: Sequence[int] = TARGET_LAYERS, compare: Sequence[str | os.PathLike] = (),
                 heldout_blocks: int = HELDOUT_BLOCKS, calibration_blocks: int = CALIBRATION_BLOCKS,
                 limit: int | None = None, profile_grid: str | None = "quick", task_set: str = TASK_SET,
                 routing_input: str = "context", bisection_steps: int = BISECTION_STEPS,
                 calibration_tolerance: float = 0.0, static_drop_samples: int = STATIC_DROP_SAMPLES):
        from rt_lib.mindskip.checkpoint import read_checkpoint_metadata
        from rt_lib.evaluation.tasks import task_set as lookup_task_set
        from rt_lib.speed.profiling import grid

        self.out = Path(out)
        self.dir = self.out / "evidence"
        self.routers = Path(routers)
        meta = read_checkpoint_metadata(self.routers)
        self.model_name = model or meta.get("base_model")
        if not self.model_name:
            raise ValueError(f"{self.routers} does not name its base model: pass model=")
        self.dtype, self.batch_size = dtype, batch_size
        chosen = lookup_task_set(task_set)  # a clear error for an unknown name, before anything runs
        if profile_grid is not None:
            grid(profile_grid)
        from rt_lib.evaluation.harness import ROUTING_INPUTS

        if routing_input not in ROUTING_INPUTS:
            raise ValueError(f"routing_input must be one of {list(ROUTING_INPUTS)}, got {routing_input!r}")
        self.task_set, self.routing_input = task_set, routing_input
        self.tasks = list(tasks or chosen.tasks)
        self.targets = [int(t) for t in targets]
        self.compare = [Path(c) for c in compare]
        self.heldout_blocks, self.calibration_blocks = heldout_blocks, calibration_blocks
        self.limit = limit  # documents per task (a smoke run), None: the task set's
        self.profile_grid = profile_grid  # rt_lib.speed.profiling grid of the speed step (None: no speed step)
        if bisection_steps < 1 or calibration_tolerance < 0 or static_drop_samples < 1:
            raise ValueError(f"bisection_steps ({bisection_steps}) and static_drop_samples ({static_drop_samples}) "
                             f"must be positive, calibration_tolerance ({calibration_tolerance}) at least 0")
        # threshold calibration (calibrate_threshold) and the static drop's importance scores
        self.bisection_steps, self.calibration_tolerance = int(bisection_steps), float(calibration_tolerance)
        self.static_drop_samples = int(static_drop_samples)
        self._base = self._tok = None

    def _json(self, name: str, make):
        """The JSON file ``name`` under the evidence folder, made (and written atomically) once."""
        path = self.dir / name
        if path.exists():
            return _read_json(path)
        value = make()
        files.atomic_write_json(path, value)
        return value

    # -- steps -----------------------------------------------------------------------------
    def plan(self) -> dict:
        from rt_lib.mindskip.checkpoint import read_checkpoint_metadata

        meta = read_checkpoint_metadata(self.routers)
        plan = {"model": self.model_name, "dtype": self.dtype, "task_set": self.task_set, "tasks": self.tasks,
                "routing_input": self.routing_input,
                "routers": str(self.routers), "routers_weights_sha256": meta.get("weights_sha256"),
                "routers_config": meta.get("config"), "target_skipped_layers": self.targets,
                "compare": [str(c) for c in self.compare], "batch_size": self.batch_size,
                "calibration_blocks": self.calibration_blocks, "heldout_blocks": self.heldout_blocks,
                "limit": self.limit, "bisection_steps": self.bisection_steps,
                "calibration_tolerance": self.calibration_tolerance, "static_drop_samples": self.static_drop_samples,
                "block_tokens": BLOCK_TOKENS}
        # a run planned before these options existed scored one forward per request, and calibrated
        # and scored the static drop with the defaults
        old = {"routing_input": "context+continuation", "bisection_steps": BISECTION_STEPS,
               "calibration_tolerance": 0.0, "static_drop_samples": STATIC_DROP_SAMPLES,
               **self._json("plan.json", lambda: plan)}
        if "task_preset" in old:  # the key's name before the task sets were called so
            old.setdefault("task_set", old.pop("task_preset"))
        changed = {k for k in plan if old.get(k) != plan[k]}
        if changed:
            raise ValueError(f"{self.dir / 'plan.json'} was written with other settings ({sorted(changed)}); "
                             "continue with the same command, or choose a new --out")
        return plan

    def _ms(self, routers: Path):
        from rt_lib.runs.checkpoints import attach_routers

        ms = attach_routers(self.base, routers)
        ms.eval()
        return ms

    def calibration(self) -> dict:
        """Thresholds of the main routers for each target, and of each ``compare`` run's routers
        for the largest target."""
        def make():
            blocks = wiki_blocks(self.tok, self.calibration_blocks)
            out = {"blocks": len(blocks), "skip": 0, "main": {}, "compare": {}}
            ms = self._ms(self.routers)
            try:
                for k in self.targets:
                    out["main"][str(k)] = calibrate_threshold(ms, blocks, self.pad_id(), k, **self._bisection())
                    log.info("threshold for %d skipped layers: %s", k, out["main"][str(k)]["threshold"])
            finally:
                ms.unload()
            for run in self.compare:
                ms = self._ms(routers_of(run))
                try:
                    out["compare"][str(run)] = {
                        "granularity": ms.config.granularity, "route_level": ms.config.route_level,
                        **calibrate_threshold(ms, blocks, self.pad_id(), max(self.targets), **self._bisection())}
                finally:
                    ms.unload()
            return out
        return self._json("calibration.json", make)

    def _bisection(self) -> dict:
        return {"steps": self.bisection_steps, "tolerance": self.calibration_tolerance}

    def variants(self) -> list[dict]:
        """The task variants in run order: dense, MindSkip at each target, its own threshold."""
        cal = self.calibration()
        from rt_lib.mindskip.checkpoint import read_checkpoint_metadata

        own = read_checkpoint_metadata(self.routers)["config"]["threshold"]
        out = [{"variant": "dense", "method": "dense", "threshold": None, "k": None}]
        out += [{"variant": f"mindskip_k{k}", "method": "mindskip", "threshold": cal["main"][str(k)]["threshold"],
                 "k": k} for k in self.targets]
        out.append({"variant": f"mindskip_t{own:g}", "method": "mindskip", "threshold": own, "k": None})
        return out

    def part_dir(self, variant: str, task: str) -> Path:
        return self.dir / "parts" / f"{variant}__{task}"

    def _part(self, variant: str, task: str, score) -> None:
        """Run ``score(out_dir)`` for one (variant, task) unless its part is already written."""
        final = self.part_dir(variant, task)
        if (final / "eval" / "results.json").exists():
            return
        start = time.perf_counter()
        with files.atomic_dir(final) as tmp:
            score(tmp)
        log.info("%s on %s: %.0f s", variant, task, time.perf_counter() - start)

    def _dense(self, task: str):
        from rt_lib.evaluation.results import EvalResults

        return EvalResults.load(self.part_dir("dense", task))

    def score_tasks(self, which: str = "all") -> None:
        """Task parts: ``dense``, ``first`` (the smallest target), ``targets`` (the other
        targets), ``rest`` (the static drops, then the routers' own threshold) or ``all``."""
        from rt_lib.evaluation.driver import evaluate

        common = dict(task_set=self.task_set, batch_size=self.batch_size, model_name=self.model_name, limit=self.limit,
                      routing_input=self.routing_input)
        variants = self.variants()
        groups = {
            "dense": [v for v in variants if v["method"] == "dense"],
            "first": [v for v in variants if v["k"] == min(self.targets)],
            "targets": [v for v in variants if v["k"] is not None and v["k"] != min(self.targets)],
            "own": [v for v in variants if v["method"] == "mindskip" and v["k"] is None],
        }
        for name in ("dense", "first", "targets"):
            if which in ("all", name):
                self._score_variants(groups[name], common, evaluate)
        if which in ("all", "rest"):
            self.score_static_drops()
            self._score_variants(groups["own"], common, evaluate)

    def _score_variants(self, todo: list[dict], common: dict, evaluate) -> None:
        """Every task of each variant in ``todo`` (dense or MindSkip at its threshold)."""
        bar = tqdm(total=len(todo) * len(self.tasks), desc="evidence parts")
        for v in todo:
            if v["method"] == "dense":
                for task in self.tasks:
                    self._part("dense", task, lambda d, t=task: evaluate(
                        self.base, self.tok, tasks=[t], variant="dense", out_dir=d, **common))
                    bar.update()
                continue
            ms = self._ms(self.routers)
            ms.set_threshold(v["threshold"])
            try:
                for task in self.tasks:
                    self._part(v["variant"], task, lambda d, t=task: evaluate(
                        ms, self.tok, tasks=[t], variant=v["variant"], method="mindskip", k=v["k"],
                        dense_reference=self._dense(t), out_dir=d, **common))
                    bar.update()
            finally:
                ms.unload()
        bar.close()

    def static_drop_ks(self) -> list[int]:
        """k of each MindSkip target: its realised skipped layers (skip ratio of all layers x layers),
        macro over the tasks, rounded."""
        from rt_lib.evaluation.results import EvalResults

        n_layers = self.num_layers()
        ks = []
        for k in self.targets:
            ratios = []
            if not all((self.part_dir(f"mindskip_k{k}", t) / "eval" / "results.json").exists() for t in self.tasks):
                continue  # not scored yet: no matched static drop
            for task in self.tasks:
                t = EvalResults.load(self.part_dir(f"mindskip_k{k}", task), num_layers=n_layers).table
                ratios.append(float(t[t.variant == f"mindskip_k{k}"].skip_ratio.iloc[0]))
            ks.append(int(round(sum(ratios) / len(ratios) * n_layers)))
        return [k for k in dict.fromkeys(ks) if 0 < k <= n_layers]

    def num_layers(self) -> int:
        """The model's layer count (the routers' config records it)."""
        return int(_read_json(self.routers / "mindskip_config.json")["num_layers"])

    def score_static_drops(self) -> None:
        from rt_lib.tuning.baselines import attention_importance, static_attention_drop
        from rt_lib.evaluation.driver import evaluate

        scores = self._json("static_drop_scores.json", lambda: dict(zip(
            ("scores", "calibration"),
            attention_importance(self.base, self.tok, num_samples=self.static_drop_samples))))
        scores_by_layer = {int(k): v for k, v in scores["scores"].items()}
        common = dict(task_set=self.task_set, batch_size=self.batch_size, model_name=self.model_name, limit=self.limit,
                      routing_input=self.routing_input)
        for k in self.static_drop_ks():
            variant = f"static_drop_k{k}"
            drop = static_attention_drop(self.base, k, self.tok, scores=scores_by_layer,
                                         scored_on=scores["calibration"])
            drop.save(self.dir / "baselines" / f"{variant}.json")
            try:
                for task in tqdm(self.tasks, desc=variant):
                    self._part(variant, task, lambda d, t=task: evaluate(
                        self.base, self.tok, tasks=[t], variant=variant, method="static_drop", k=k,
                        dense_reference=self._dense(t), out_dir=d, **common))
            finally:
                drop.restore()

    def score_heldout(self) -> None:
        """Per-block held-out loss of every variant (one file each, ``heldout/<variant>.json``)."""
        from rt_lib.tuning.baselines import static_attention_drop

        blocks = wiki_blocks(self.tok, self.heldout_blocks, skip=self.calibration_blocks)
        cal = self.calibration()
        pad = self.pad_id()

        def losses_of(model):
            return block_losses(model, blocks, pad, self.batch_size)

        def write(name: str, info: dict, run):
            path = self.dir / "heldout" / f"{name}.json"
            if not path.exists():
                start = time.perf_counter()
                losses, skipped = run()
                files.atomic_write_json(path, {**info, "variant": name, "losses": losses, "skipped": skipped,
                                              "blocks": len(blocks), "wall_s": time.perf_counter() - start})
                log.info("held-out loss of %s: %.4f", name, sum(losses) / len(losses))

        write("dense", {"method": "dense"}, lambda: (losses_of(self.base), 0.0))
        main = [(v, self.routers, v["threshold"]) for v in self.variants() if v["method"] == "mindskip"]
        comp = [({"variant": f"{c['granularity']}_{c['route_level']}_k{max(self.targets)}", "method": "mindskip",
                  "threshold": c["threshold"], "k": max(self.targets)}, routers_of(Path(run)), c["threshold"])
                for run, c in cal["compare"].items()]
        for v, routers, tau in main + comp:
            def run(routers=routers, tau=tau):
                ms = self._ms(routers)
                ms.set_threshold(tau)
                try:
                    ms.reset_stats()
                    losses = losses_of(ms)
                    return losses, float(sum(1.0 - c for c in ms.capacities().values()))
                finally:
                    ms.unload()
            ms_cfg = _read_json(routers / "mindskip_config.json")["config"]
            write(v["variant"], {"method": "mindskip", "threshold": tau, "k": v["k"], "routers": str(routers),
                                 "granularity": ms_cfg["granularity"], "route_level": ms_cfg["route_level"]}, run)
        scores_file = self.dir / "static_drop_scores.json"
        scores = _read_json(scores_file) if scores_file.exists() else None
        # static drop at each target (MindSkip's count on this text) and at each task-matched k
        for k in (sorted(set(self.static_drop_ks()) | set(self.targets)) if scores else []):
            def run(k=k):
                by_layer = {int(i): s for i, s in scores["scores"].items()}
                drop = static_attention_drop(self.base, k, self.tok, scores=by_layer)
                try:
                    return losses_of(self.base), float(k)
                finally:
                    drop.restore()
            write(f"static_drop_k{k}", {"method": "static_drop", "k": k, "granularity": "attn"}, run)

    def profile_speed(self) -> None:
        """Dense and MindSkip timed at the largest target's threshold on the ``quick`` profile
        grid (``<out>/profile/``), so that the speedup of claim C6 is measured at an operating
        point whose accuracy this run scores."""
        from rt_lib.speed import step as profile_step
        from rt_lib.speed import profiling

        if self.profile_grid is None or (self.out / "profile" / "profile.json").exists():
            return
        threshold = self.calibration()["main"][str(max(self.targets))]["threshold"]
        settings = profiling.grid(self.profile_grid, variants=["dense", "mindskip"], threshold=threshold)
        profile_step.run_step(self.base, self.tok, self.out, settings, routers=str(self.routers),
                              grid_name=self.profile_grid, model_name=self.model_name)

    def combine(self):
        """``<out>/eval/`` from every part, and the measures table."""
        from rt_lib.evaluation.results import EvalResults
        from rt_lib.evaluation.measures import evidence_measures

        from rt_lib.evaluation.measures import heldout_table

        parts = sorted(p for p in (self.dir / "parts").iterdir() if not p.name.startswith("."))
        by_variant: dict[str, list[Path]] = {}
        for p in parts:
            by_variant.setdefault(p.name.split("__")[0], []).append(p)
        incomplete = sorted(v for v, ps in by_variant.items() if len(ps) < len(self.tasks))
        if incomplete:
            log.warning("not combined, some tasks still missing (run the same command again to finish): %s",
                        ", ".join(incomplete))
        parts = [p for v, ps in by_variant.items() if v not in incomplete for p in ps]
        num_layers = self.num_layers()
        results = EvalResults.combine([EvalResults.load(p, num_layers=num_layers) for p in parts])
        # static drop has no gates to count: its skip ratio is k / all layers, the definition of
        # MindSkip's realised ratio (as rt_lib.evaluation.sweep writes it)
        # the variants' columns from this run's plan (the parts' own rows agree with it)
        specs = {v["variant"]: (v["method"], v["k"]) for v in self.variants()}
        specs.update({f"static_drop_k{k}": ("static_drop", k) for k in self.static_drop_ks()})
        for col, i in (("method", 0), ("k", 1)):
            results.table[col] = [specs[v][i] if v in specs else x for v, x in zip(results.table.variant,
                                                                                 results.table[col])]
        results.table["k"] = results.table["k"].astype("Int64")
        is_drop = results.table.method == "static_drop"
        results.table.loc[is_drop, "skip_ratio"] = results.table.loc[is_drop, "k"].astype(float) / num_layers
        results.save(self.out)
        table = evidence_measures(self.out, num_layers=num_layers)
        files.write_csv(self.dir / "measures.csv", table)
        files.write_csv(self.dir / "heldout.csv", heldout_table(self.dir, num_layers))
        return table

    def run(self):
        files.hold_folder(self.out, "evidence run")
        self.plan()
        runs.new_run(root=self.out.parent, run_id=self.out.name) if not (
            self.out / runs.RUN_FILE).exists() else None
        self.calibration()
        # run order: the comparisons the claims need first, so that an interrupted run (to be
        # continued with the same command) already decides most of them: dense and the first
        # operating point on the tasks, every held-out loss, the other operating points, the
        # speed at the largest target, the static drops on the tasks, the routers' own threshold
        self.score_tasks("dense")
        self.score_tasks("first")
        self.score_heldout()
        self.score_tasks("targets")
        self.profile_speed()
        self.score_tasks("rest")
        self.score_heldout()  # held-out loss of static drops matched on the tasks, if new
        return self.combine()


def _read_json(path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def routers_of(run: Path) -> Path:
    """A router checkpoint folder, or a run folder holding one under ``train/routers``."""
    run = Path(run)
    return run if (run / "mindskip_config.json").exists() else run / "train" / "routers"

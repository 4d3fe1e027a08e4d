"""The frontier of held-out LM loss against skipped attention layers, for router sets and for
static drops, measured on the same text so that every comparison is paired and at equal skip.

    python -m rt_lib frontier --out results/runs/router-frontier \\
        --routers cpu=results/runs/recipe-cpu/train/routers --routers global=...

x: attention sublayers skipped per sequence (of all the model's layers: the paper's definition),
realised on the held-out text; y: mean next-token loss increase over dense on ``HELDOUT_BLOCKS``
256-token blocks of the embedded Wikipedia validation text, with its paired 95% interval over
blocks. The blocks are the evidence run's (``rt_lib.evidence.run.wiki_blocks``): the first
``CALIBRATION_BLOCKS`` choose thresholds and static layers, the next ``HELDOUT_BLOCKS`` score.

Curves:

* ``static_importance``: remove the ``k`` attention sublayers with the lowest 1 - cos(h_in, h_out)
  (the paper's static baseline, ``rt_lib.tuning.baselines``), for each ``k`` in ``LEVELS``;
* ``static_greedy``: the best static drop found by a greedy search: starting from the dense
  model, repeatedly remove the attention sublayer whose removal gives the lowest loss on the
  first ``GREEDY_BLOCKS`` calibration blocks (a nested set, each ``k`` extends ``k - 1``). This is
  the bar a router must clear to show that *input-dependent* depth adds anything;
* ``mindskip:<name>``: each router set at the thresholds that skip ``k`` layers per sequence on
  the calibration blocks (bisection, to within ``CALIBRATION_TOLERANCE`` layers), and at its own
  threshold. Router sets with the same weights and configuration (two recipes that tuned the same
  routers) share their points: the later one's part is a copy that names the first
  (``same_routers_as``), not a second measurement.

For each MindSkip point the table also gives its difference from each static drop at the *same
realised skip*: per block, the static drop's losses interpolated linearly between the two whole
numbers of layers around the routers' realised skip (``vs_importance_*``, ``vs_greedy_*``;
negative: the routers' loss is lower). The interpolation is the loss of a static policy that
removes the larger number of layers from that share of sequences and the smaller from the rest,
which skips exactly as many layers on average, so the difference is paired and at equal skip. And
how input-dependent the routers are: routed layers whose decision is the same for >= 95% of
blocks, and the distinct decision patterns over the held-out blocks.

Every point is one JSON part under ``<out>/frontier/parts/`` written atomically; a run that is
interrupted continues with the first missing part. ``combine`` writes
``<out>/frontier/frontier.csv``; ``python -m rt_lib paper`` copies it to ``results/tables/`` and plots it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rt_lib import files
from rt_lib.evidence.run import ModelHolder, score_blocks

log = logging.getLogger(__name__)

LEVELS = (2, 4, 6, 8, 10)
CALIBRATION_BLOCKS = 32
HELDOUT_BLOCKS = 128
GREEDY_BLOCKS = 16
BISECTION_STEPS = 14
# the calibration stops once the calibration blocks skip within this many layers of the target: the
# comparisons with the static drops are made at the realised skip, so closer only costs time
CALIBRATION_TOLERANCE = 0.125
STABLE = 0.95  # a layer is "static" for a router set when one decision covers this share of blocks
FRONTIER_CSV = "frontier.csv"


def skipped_per_block(keep: list[list[bool]]) -> list[int]:
    return [sum(1 for k in row if not k) for row in keep]


def input_dependence(keep: list[list[bool]], layers: list[int], stable: float = STABLE) -> dict:
    """Routed layers whose decision is the same for >= ``stable`` of the blocks, and the number of
    distinct decision patterns (which layers are skipped) over the blocks."""
    if not keep:
        return {"static_layers": [], "static_layers_n": 0, "patterns": 0}
    arr = np.asarray(keep, dtype=bool)
    share_kept = arr.mean(0)
    static = [layers[j] for j in range(arr.shape[1]) if max(share_kept[j], 1 - share_kept[j]) >= stable]
    return {"static_layers": static, "static_layers_n": len(static),
            "patterns": len({tuple(r) for r in arr.tolist()})}


class Frontier(ModelHolder):
    """One frontier folder; every point is a file, present parts are never recomputed."""

    def __init__(self, out: str | os.PathLike, routers: dict[str, str | os.PathLike], *, model: str | None = None,
                 dtype: str = "auto", levels=LEVELS, batch_size: int = 8, heldout_blocks: int = HELDOUT_BLOCKS,
                 calibration_blocks: int = CALIBRATION_BLOCKS, greedy_blocks: int = GREEDY_BLOCKS,
                 bisection_steps: int = BISECTION_STEPS, calibration_tolerance: float = CALIBRATION_TOLERANCE):
        from rt_lib.mindskip.checkpoint import read_checkpoint_metadata

        self.out = Path(out)
        self.dir = self.out / "frontier"
        # NAME -> folder, or folder@k1+k2 to place a router set at those levels only (a set tuned for one point;
        # no point at its own threshold)
        self.routers, self.router_levels = {}, {}
        for name, spec in routers.items():
            folder, at, ks = str(spec).rpartition("@")
            if at and ks and all(k.isdigit() for k in ks.split("+")):
                self.routers[name], self.router_levels[name] = Path(folder), [int(k) for k in ks.split("+")]
            else:
                self.routers[name], self.router_levels[name] = Path(spec), None
        bases = {name: read_checkpoint_metadata(p).get("base_model") for name, p in self.routers.items()}
        self.model_name = model or next((b for b in bases.values() if b), None) or "smollm2-135m-instruct"
        self.dtype, self.batch_size = dtype, batch_size
        self.levels = [int(k) for k in levels]
        self.heldout_blocks, self.calibration_blocks = heldout_blocks, calibration_blocks
        self.greedy_blocks = min(greedy_blocks, calibration_blocks)
        self.bisection_steps, self.calibration_tolerance = bisection_steps, calibration_tolerance
        self._base = self._tok = self._blocks = None

    def blocks(self) -> tuple[list[dict], list[dict]]:
        """(calibration, held-out) blocks: the evidence run's, disjoint."""
        if self._blocks is None:
            from rt_lib.evidence.run import wiki_blocks

            both = wiki_blocks(self.tok, self.calibration_blocks + self.heldout_blocks)
            self._blocks = both[:self.calibration_blocks], both[self.calibration_blocks:]
        return self._blocks

    def _part(self, name: str, make) -> dict:
        path = self.dir / "parts" / f"{name}.json"
        if path.exists():
            return _read_json(path)
        start = time.perf_counter()
        value = {"part": name, **make()}
        value["wall_s"] = round(time.perf_counter() - start, 2)
        files.atomic_write_json(path, value)
        return value

    def plan(self) -> dict:
        from rt_lib.mindskip.checkpoint import read_checkpoint_metadata

        plan = {"model": self.model_name, "dtype": self.dtype, "levels": self.levels,
                "routers": {n: {"path": str(p), "weights_sha256": read_checkpoint_metadata(p).get("weights_sha256"),
                                "levels": self.router_levels[n]} for n, p in self.routers.items()},
                "calibration_blocks": self.calibration_blocks, "heldout_blocks": self.heldout_blocks,
                "greedy_blocks": self.greedy_blocks, "batch_size": self.batch_size,
                "num_layers": int(self.base.config.num_hidden_layers)}
        path = self.dir / "plan.json"
        if path.exists():
            old = _read_json(path)
            old_routers = old.get("routers", {})
            # a router set is its weights: the same file under another path (a moved checkout) continues
            clash = sorted(n for n in plan["routers"] if n in old_routers
                           and old_routers[n].get("weights_sha256") != plan["routers"][n]["weights_sha256"])
            fixed = [k for k in ("model", "dtype", "calibration_blocks", "heldout_blocks", "greedy_blocks", "num_layers")
                     if old.get(k) != plan[k]]
            if clash or fixed:
                raise ValueError(f"{path} was written with other settings ({fixed + clash}); continue with the same "
                                 "settings and routers, or choose a new --out")
            plan["routers"] = {**old_routers, **plan["routers"]}
            plan["levels"] = sorted(set(old.get("levels", [])) | set(plan["levels"]))
        files.atomic_write_json(path, plan)
        return plan

    # -- points ----------------------------------------------------------------------------
    def dense(self) -> dict:
        return self._part("dense", lambda: {"family": "dense", "k": 0, "layers": [],
                                            **score_blocks(self.base, self.blocks()[1], self.pad_id(), self.batch_size)})

    def _static(self, family: str, name: str, layers: list[int], extra: dict | None = None) -> dict:
        from rt_lib.mindskip.removal import drop_sublayers

        def make():
            handle = drop_sublayers(self.base, layers, granularity="attn") if layers else None
            try:
                scored = score_blocks(self.base, self.blocks()[1], self.pad_id(), self.batch_size)
            finally:
                if handle is not None:
                    handle.restore()
            return {"family": family, "k": len(layers), "layers": sorted(layers), **(extra or {}), **scored}
        return self._part(name, make)

    def importance(self) -> dict:
        from rt_lib.tuning.baselines import attention_importance

        def make():
            scores, calib = attention_importance(self.base, self.tok, examples=self.blocks()[0], batch_size=self.batch_size)
            return {"scores": {str(i): s for i, s in scores.items()}, "calibration": calib}
        return self._part("importance", make)

    def greedy(self) -> dict:
        """The greedy static drop's order, up to the largest level."""
        from rt_lib.tuning.baselines import droppable_layers
        from rt_lib.mindskip.removal import drop_sublayers

        def make():
            cal = self.blocks()[0][:self.greedy_blocks]
            chosen: list[int] = []
            trace = []
            pool = droppable_layers(self.base)
            steps = tqdm(range(max(self.levels)), desc="greedy static drop", leave=False)
            for _ in steps:
                best = None
                for i in [i for i in pool if i not in chosen]:
                    handle = drop_sublayers(self.base, chosen + [i], granularity="attn")
                    try:
                        loss = float(np.mean(score_blocks(self.base, cal, self.pad_id(), self.batch_size)["losses"]))
                    finally:
                        handle.restore()
                    if best is None or loss < best[1]:
                        best = (i, loss)
                chosen.append(best[0])
                trace.append({"k": len(chosen), "added": best[0], "calibration_loss": best[1]})
                steps.set_postfix(k=len(chosen), layer=best[0], loss=f"{best[1]:.4f}")
            return {"order": chosen, "trace": trace, "candidates": pool, "calibration_blocks": len(cal)}
        return self._part("greedy", make)

    def _identity(self, routers: Path) -> tuple:
        from rt_lib.mindskip.checkpoint import read_checkpoint_metadata

        meta = read_checkpoint_metadata(routers)
        return meta.get("weights_sha256"), json.dumps(meta.get("config"), sort_keys=True), meta.get("routed_layers")

    def _mindskip(self, name: str, routers: Path, k: int | None) -> dict:
        from rt_lib.runs.checkpoints import attach_routers
        from rt_lib.evidence.calibration import calibrate_threshold

        point = f"{'own' if k is None else f'k{k}'}"
        twin = next((other for other, path in self.routers.items() if other != name
                     and self._identity(path) == self._identity(routers)
                     and (self.dir / "parts" / f"mindskip-{other}__{point}.json").exists()), None)
        if twin is not None:
            def make():
                first = _read_json(self.dir / "parts" / f"mindskip-{twin}__{point}.json")
                drop = ("part", "family", "wall_s", "same_routers_as")
                return {"family": f"mindskip:{name}", **{k_: v for k_, v in first.items() if k_ not in drop},
                        "same_routers_as": twin}
            return self._part(f"mindskip-{name}__{point}", make)

        def make():
            ms = attach_routers(self.base, routers)
            ms.eval()
            try:
                if ms.config.route_level != "seq" or ms.config.granularity != "attn":
                    raise ValueError(f"routers {routers}: the frontier compares attention routers at sequence level")
                if k is None:
                    cal = {"threshold": ms.config.threshold}
                else:
                    cal = calibrate_threshold(ms, self.blocks()[0], self.pad_id(), k, steps=self.bisection_steps,
                                              tolerance=self.calibration_tolerance)
                    ms.set_threshold(cal["threshold"])
                scored = score_blocks(ms, self.blocks()[1], self.pad_id(), self.batch_size, ms=ms)
                layers = list(ms.routed_layers)
            finally:
                ms.unload()
            return {"family": f"mindskip:{name}", "k": k, "threshold": cal["threshold"],
                    "calibration_skipped": cal.get("skipped"), "calibration_steps": len(cal.get("trace", [])),
                    "calibration_tolerance": None if k is None else self.calibration_tolerance,
                    "routed_layers": layers, **scored}
        return self._part(f"mindskip-{name}__{point}", make)

    def run(self) -> Path:
        files.hold_folder(self.out, "frontier")
        self.plan()
        jobs = [("dense", self.dense), ("importance", self.importance), ("greedy", self.greedy)]
        todo = [(n, r, k) for n, r in self.routers.items() for k in _points(self.router_levels[n], self.levels)]
        bar = tqdm(total=len(jobs) + 2 * len(self.levels) + len(todo), desc="frontier points")
        for _, job in jobs:
            job()
            bar.update()
        scores = {int(i): s for i, s in self.importance()["scores"].items()}
        from rt_lib.tuning.baselines import choose_lowest, droppable_layers

        pool = droppable_layers(self.base)
        order = self.greedy()["order"]
        for k in self.levels:
            self._static("static_importance", f"static_importance__k{k}", choose_lowest(scores, k, pool))
            bar.update()
            self._static("static_greedy", f"static_greedy__k{k}", order[:k])
            bar.update()
        for name, routers, k in todo:
            bar.set_postfix_str(f"{name} {'own' if k is None else k}")
            self._mindskip(name, routers, k)
            bar.update()
        bar.close()
        return self.combine()

    def combine(self) -> Path:
        rows = frontier_table(self.dir, self.num_layers())
        return files.write_csv(self.dir / FRONTIER_CSV, rows)

    def num_layers(self) -> int:
        return int(_read_json(self.dir / "plan.json")["num_layers"])


# ------------------------------------------------------------------------- table
def _points(own_levels: list[int] | None, levels: list[int]) -> list[int | None]:
    """The points of one router set: every level and its own threshold (``None``), or only the
    levels it was tuned for (``NAME=FOLDER@k``: a set tuned for one operating point runs there)."""
    return list(own_levels) if own_levels else [*levels, None]


def _read_json(path) -> dict:
    import json

    return json.loads(Path(path).read_text())


def _ci(d: np.ndarray) -> tuple[float, float, float]:
    from rt_lib.evaluation.stats import paired_difference

    p = paired_difference(d, np.zeros_like(d))
    return p.diff, p.ci_low, p.ci_high


def static_at(parts: dict[int, np.ndarray], x: float, tolerance: float = CALIBRATION_TOLERANCE) -> np.ndarray | None:
    """Per-block losses of a nested static drop at ``x`` layers, interpolated linearly between
    the whole numbers around it (``parts``: k -> per-block losses, with k = 0 the dense model).
    Beyond the largest ``k`` by at most ``tolerance`` layers (a point calibrated to that level), the
    largest ``k``'s losses: equal skip within the calibration's tolerance, and the static drop then
    skips slightly less, which favours it by no more than that; None further out."""
    ks = sorted(parts)
    if ks and ks[-1] < x <= ks[-1] + tolerance:
        return parts[ks[-1]]
    if not ks or x < ks[0] or x > ks[-1]:
        return None
    lo = max(k for k in ks if k <= x)
    hi = min(k for k in ks if k >= x)
    if lo == hi:
        return parts[lo]
    w = (x - lo) / (hi - lo)
    return (1 - w) * parts[lo] + w * parts[hi]


def frontier_table(folder: str | Path, num_layers: int) -> list[dict]:
    """One row per point: family, target and realised skipped layers, loss increase over dense
    with its paired interval, and for MindSkip points the difference from the greedy static drop
    at the same realised skip (per block, interpolated) and the input-dependence of the routers."""
    folder = Path(folder)
    parts = {p.stem: _read_json(p) for p in sorted((folder / "parts").glob("*.json"))}
    if "dense" not in parts:
        raise FileNotFoundError(f"{folder}/parts/dense.json is missing: run the frontier first")
    dense = np.asarray(parts["dense"]["losses"])
    statics = {fam: {0: dense, **{p["k"]: np.asarray(p["losses"]) for p in parts.values() if p.get("family") == fam}}
               for fam in ("static_importance", "static_greedy")}
    rows = []
    for name, p in parts.items():
        family = p.get("family")
        if family not in ("static_importance", "static_greedy") and not str(family).startswith("mindskip:"):
            continue
        losses = np.asarray(p["losses"])
        d, lo, hi = _ci(losses - dense)
        row = {"family": family, "point": name, "target_skipped": p["k"], "threshold": p.get("threshold"),
               "layers": " ".join(map(str, p.get("layers", []))) if "layers" in p else "",
               "blocks": len(losses), "loss": float(losses.mean()), "dense_loss": float(dense.mean()),
               "loss_increase": d, "ci_low": lo, "ci_high": hi}
        if family.startswith("mindskip:"):
            skipped = np.asarray(skipped_per_block(p["keep"]), dtype=float)
            row["skipped"] = float(skipped.mean())
            row["skipped_sd"] = float(skipped.std(ddof=0))
            dep = input_dependence(p["keep"], p["routed_layers"])
            row.update({"static_layers": dep["static_layers_n"], "patterns": dep["patterns"]})
            for fam, short in (("static_importance", "importance"), ("static_greedy", "greedy")):
                ref = static_at(statics[fam], row["skipped"])
                if ref is not None:
                    v, vlo, vhi = _ci(losses - ref)
                    row.update({f"vs_{short}_equal_skip": v, f"vs_{short}_ci_low": vlo, f"vs_{short}_ci_high": vhi})
        else:
            row["skipped"] = float(p["k"])
            row["skipped_sd"] = 0.0
        row["skipped_share"] = row["skipped"] / num_layers
        rows.append(row)
    rows.sort(key=lambda r: (r["family"], r["skipped"]))
    cols = ["family", "point", "target_skipped", "threshold", "skipped", "skipped_sd", "skipped_share", "blocks",
            "dense_loss", "loss", "loss_increase", "ci_low", "ci_high", "vs_importance_equal_skip",
            "vs_importance_ci_low", "vs_importance_ci_high", "vs_greedy_equal_skip", "vs_greedy_ci_low",
            "vs_greedy_ci_high", "static_layers", "patterns", "layers"]
    return [{c: r.get(c) for c in cols} for r in rows]


def missing_points(folder: str | Path) -> list[str]:
    """Parts the frontier's plan asks for that are not written yet (empty: the frontier is complete)."""
    folder = Path(folder)
    plan = _read_json(folder / "plan.json")
    levels = plan["levels"]
    want = ["dense", *(f"{fam}__k{k}" for fam in ("static_importance", "static_greedy") for k in levels)]
    want += [f"mindskip-{name}__{'own' if k is None else f'k{k}'}" for name, r in plan["routers"].items()
             for k in _points(r.get("levels"), levels)]
    return [w for w in want if not (folder / "parts" / f"{w}.json").exists()]


def recipe_scores(rows: list[dict] | "pd.DataFrame", among: list[str] | None = None) -> "pd.DataFrame":
    """Per router set placed at every level (``among``: only these set names): the mean loss
    difference from the greedy and from the importance static drop at the same realised skip
    (``vs_greedy_equal_skip``, ``vs_importance_equal_skip``), over the levels at which every such
    set has that difference (a point that skips more than the static curves reach has none).
    Index: set name; sorted by ``mean_vs_greedy``, best first; empty when no set qualifies."""
    import pandas as pd

    df = pd.DataFrame(rows)
    cols = ["mean_vs_greedy", "mean_vs_importance", "levels"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    for c in ("vs_greedy_equal_skip", "vs_importance_equal_skip"):
        if c not in df:
            df[c] = float("nan")
    placed = df[df.family.str.startswith("mindskip:") & df.target_skipped.notna()]
    levels = set(placed.target_skipped)
    ms = placed if among is None else placed[placed.family.isin([f"mindskip:{n}" for n in among])]
    full = ms.groupby("family").filter(lambda d: set(d.target_skipped) == levels)
    if full.empty:
        return pd.DataFrame(columns=cols)
    comparable = set.intersection(*(set(d.target_skipped[d.vs_greedy_equal_skip.notna()])
                                    for _, d in full.groupby("family")))
    at = full[full.target_skipped.isin(comparable)]
    if at.empty:
        return pd.DataFrame(columns=cols)
    out = at.groupby("family").agg(mean_vs_greedy=("vs_greedy_equal_skip", "mean"),
                                   mean_vs_importance=("vs_importance_equal_skip", "mean"))
    out["levels"] = "+".join(str(int(k)) for k in sorted(comparable))
    out.index = [str(f).split(":", 1)[1] for f in out.index]
    return out.sort_values("mean_vs_greedy", kind="stable")


def winning_recipe(rows: list[dict] | "pd.DataFrame", among: list[str] | None = None) -> str | None:
    """The router set whose loss is lowest relative to the greedy static drop *at the same realised
    skip*, averaged over the frontier's levels, among the sets placed at every level (``among``:
    only these set names; ``recipe_scores``): a set that skips more is not rewarded or punished for
    it, as the loss increase alone would."""
    scores = recipe_scores(rows, among)
    return None if scores.empty else str(scores.index[0])


# ------------------------------------------------------------------------- figure
def plot_frontier(csv_path, title: str | None = None):
    """Loss increase over dense against realised skipped layers, one curve per family, with
    the paired 95% interval of every point."""
    import pandas as pd

    from rt_lib.plots import OKABE_ITO, new_figure

    df = pd.read_csv(csv_path)
    fig, axes = new_figure(size=(7.5, 4.8))
    ax = axes[0, 0]
    colors = [c for name, c in OKABE_ITO.items() if name != "black"]
    markers = "osD^v<>pXh*"
    for j, (family, d) in enumerate(df.groupby("family", sort=True)):
        d = d[d["target_skipped"].notna()].sort_values("skipped") if family.startswith("mindskip") else d.sort_values("skipped")
        static = family.startswith("static")
        ax.errorbar(d["skipped"], d["loss_increase"],
                    yerr=[d["loss_increase"] - d["ci_low"], d["ci_high"] - d["loss_increase"]],
                    label=family.replace("mindskip:", "MindSkip ").replace("static_", "static drop, "),
                    color="black" if family == "static_greedy" else colors[j % len(colors)],
                    linestyle="--" if static else "-", marker=markers[j % len(markers)], markersize=4, capsize=2,
                    linewidth=1.6 if static else 1.1)
    ax.set_xlabel("attention sublayers skipped per sequence (held-out, of all layers)")
    ax.set_ylabel("held-out loss increase over dense (nats)")
    ax.set_title(title or "Router recipes vs static drops (paired 95% intervals over blocks)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def write_frontier(results_root: str | Path, out_tables: str | Path, out_figures: str | Path | None,
                   formats=("png",)) -> dict[str, list[Path]]:
    """``router_frontier.csv`` (rebuilt from the parts of every frontier run under
    ``<results_root>/runs``, the newest last), its figure, and ``router_recipes.csv`` (the tuned
    recipes, ``rt_lib.tuning.router_study.recipe_table``). Nothing is written when there is no frontier run."""
    import shutil

    from rt_lib.plots import save_figure
    from rt_lib.tuning.router_study import recipe_table

    found = sorted(p.parent for p in Path(results_root).glob("runs/*/frontier/plan.json")
                   if (p.parent / "parts" / "dense.json").exists())
    if not found:
        return {}
    folder = found[-1]
    rows = frontier_table(folder, int(_read_json(folder / "plan.json")["num_layers"]))
    csv_path = files.write_csv(folder / FRONTIER_CSV, rows)
    out: dict[str, list[Path]] = {"router_frontier": [Path(out_tables) / "router_frontier.csv"]}
    Path(out_tables).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(csv_path, out["router_frontier"][0])
    recipes = recipe_table(Path(results_root) / "runs")
    scores = recipe_scores(rows)
    for r in recipes:  # where each tuned recipe stands on the frontier (blank: not placed at every level)
        got = scores.loc[r["recipe"]] if r["recipe"] in scores.index else None
        r.update({k: (None if got is None else got[k]) for k in ("mean_vs_greedy", "mean_vs_importance", "levels")})
    if recipes:
        out["router_recipes"] = [files.write_csv(Path(out_tables) / "router_recipes.csv", recipes)]
    if out_figures is not None:
        win = winning_recipe(rows)
        missing = missing_points(folder)
        state = f"winner: {win}" if not missing else f"incomplete: {len(missing)} points to measure"
        fig = plot_frontier(csv_path,
                            title=f"Router recipes vs static drops\n({state}; paired 95% intervals over blocks)")
        out["router_frontier_figure"] = save_figure(fig, Path(out_figures) / "router_frontier", formats=formats)
    return out

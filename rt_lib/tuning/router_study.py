"""The router recipe study: which tuning recipe gives MindSkip routers the best frontier of
held-out loss against skipped attention layers, and does any beat a static drop?

    python -m rt_lib router-study tune --out results/runs        # every recipe, resumable
    python -m rt_lib router-study tune --out results/runs --only cpu,global

Each study recipe is the ``cpu`` training recipe with the overrides in ``STUDY_RECIPES``; its run folder is
``<out>/recipe-<name>/`` (the usual ``train/`` layout). A recipe whose ``train/summary.json``
says ``finished`` is skipped; one with checkpoints resumes from the latest. The frontier itself
(held-out loss at each number of skipped layers, every recipe and the static baselines) is
``rt_lib.evidence.frontier`` (``python -m rt_lib frontier``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

ROUTED = 16  # routed attention sublayers of the cpu recipe (layers 13..28 of 30)
TARGET_LAYERS = (2, 4, 6, 8, 10)  # skipped attention sublayers per sequence: the frontier's x


def _target(k: int) -> float:
    """Capacity target that skips ``k`` of the ``ROUTED`` routed layers per sequence."""
    return round(1.0 - k / ROUTED, 4)


# name -> (overrides of the cpu recipe, what it tests)
STUDY_RECIPES: dict[str, tuple[dict, str]] = {
    "cpu": ({}, "the cpu recipe: 16 steps of 8 x 256 tokens, lr 1e-3, per-layer regulariser lambda 0.3, s 0.5, "
                "zero-initialised routers"),
    "global": ({"reg_form": "global"},
               "the cpu recipe with one global budget lambda * n * ReLU(mean capacity - s)"),
    "gradual": ({"router_init": 0.75, "reg_form": "global", "lr": 3e-3, "num_samples": 512, "warmup_ratio": 0.1},
                "routers start at score 0.75 (a bias), away from the threshold, and are pulled down by a global "
                "budget over 64 steps (lr 3e-3, 10% warm-up) instead of all flipping at the first step"),
    "annealed": ({"router_init": 0.75, "reg_form": "global", "lr": 3e-3, "num_samples": 512, "warmup_ratio": 0.1,
                  "target_anneal": 0.75},
                 "the gradual start with its capacity target falling from 1.0 to s over the first 75% of the 64 "
                 "steps: the budget pulls capacity down only as far as the current target, so the routers drop "
                 "layers one at a time instead of overshooting"),
    "annealed-16": ({"router_init": 0.75, "reg_form": "global", "lr": 1e-2, "warmup_ratio": 0.1, "target_anneal": 0.75},
                    "the annealed recipe in the cpu recipe's budget (16 steps of 8 x 256 tokens, the main job's "
                    "tuning time), its learning rate raised to 1e-2 for the 4x fewer steps"),
    "annealed-16-gentle": ({"router_init": 0.75, "reg_form": "global", "lr": 5e-3, "warmup_ratio": 0.1,
                            "target_anneal": 1.0},
                           "annealed-16 with half its learning rate and the target falling over all 16 steps "
                           "(reaching s at the last): smaller steps when the routers start to cross the threshold"),
    "paper-budget": ({"batch_size": 64, "micro_batch_size": 8, "max_length": 512, "num_samples": 959,
                      "save_every": 2},
                     "the paper's batch and data size: effective batch 64, every 512-token block of the embedded "
                     "Wikipedia training text (959 blocks, 491 K tokens, 14 steps), otherwise the cpu recipe"),
    **{f"target-k{k}": ({"capacity_target": _target(k)},
                        f"the cpu recipe with its target set to the operating point it runs at: s = {_target(k)} "
                        f"(skip {k} of {ROUTED} routed layers)") for k in TARGET_LAYERS},
}
ORDER = ("cpu", "global", "gradual", "annealed", *(f"target-k{k}" for k in TARGET_LAYERS), "paper-budget", "annealed-16", "annealed-16-gentle")


def run_dir(out: str | Path, name: str) -> Path:
    return Path(out) / f"recipe-{name}"


def finished(folder: Path) -> bool:
    summary = folder / "train" / "summary.json"
    return summary.is_file() and bool(json.loads(summary.read_text()).get("finished"))


def tune(name: str, out: str | Path, **extra):
    """Tune recipe ``name`` into ``<out>/recipe-<name>`` (resuming from its latest checkpoint)."""
    from rt_lib.tuning.train import train_routers

    if name not in STUDY_RECIPES:
        raise ValueError(f"unknown study recipe {name!r}; study recipes: {', '.join(STUDY_RECIPES)}")
    folder = run_dir(out, name)
    if finished(folder):
        log.info("recipe %s: finished already (%s)", name, folder)
        return None
    resume = "latest" if any((folder / "train" / "checkpoints").glob("step-*")) else None
    overrides, _ = STUDY_RECIPES[name]
    return train_routers("cpu", out=str(folder), resume_from=resume, **{**overrides, **extra})


COLLAPSE = 0.1  # a training log "collapses" when its mean capacity falls this far below where it ends


def recipe_table(runs_root: str | Path) -> list[dict]:
    """One row per tuned recipe folder ``<runs_root>/recipe-<name>``: its options, budget, wall
    time, held-out result and whether its training collapsed (the lowest mean capacity of the
    log more than ``COLLAPSE`` below the final one: routers switched off, then recovered)."""
    import csv

    rows = []
    for folder in sorted(Path(runs_root).glob("recipe-*")):
        name = folder.name[len("recipe-"):]
        summary_path, log_path = folder / "train" / "summary.json", folder / "train" / "log.csv"
        if not (summary_path.is_file() and log_path.is_file()):
            continue
        s = json.loads(summary_path.read_text())
        with open(log_path, newline="") as f:
            log_rows = list(csv.DictReader(f))
        caps = [float(r["mean_capacity"]) for r in log_rows]
        c = s.get("config", {})
        held = s.get("heldout_lm_loss") or {}
        first_low = next((int(r["step"]) for r in log_rows if float(r["mean_capacity"]) < caps[-1] - COLLAPSE), None)
        rows.append({
            "recipe": name, "finished": s.get("finished"), "what": STUDY_RECIPES.get(name, ({}, ""))[1],
            "steps": s.get("steps"), "batch_size": c.get("batch_size"), "max_length": c.get("max_length"),
            "tokens": int(log_rows[-1]["tokens"]) if log_rows else None, "lr": c.get("lr"),
            "warmup_ratio": c.get("warmup_ratio"), "reg_form": c.get("reg_form", "layer"),
            "reg_lambda": c.get("reg_lambda"), "capacity_target": c.get("capacity_target"),
            "target_anneal": (s.get("train_config") or {}).get("target_anneal", 0.0),
            "router_init": c.get("router_init", 0.5), "wall_time_s": s.get("wall_time_s"),
            "final_mean_capacity": caps[-1] if caps else None, "min_mean_capacity": min(caps) if caps else None,
            "collapsed": bool(caps) and min(caps) < caps[-1] - COLLAPSE, "collapse_step": first_low,
            "heldout_dense_loss": held.get("dense"), "heldout_tuned_loss": held.get("tuned"),
            "heldout_skip_ratio": s.get("heldout_skip_ratio"),
        })
    return rows

"""Which base model and router checkpoint a step of a run folder uses (notebooks 02 and 03).

    ckpt = resolve_checkpoint(run_dir, model=None, routers=None, preset="cpu")
    base, tok = load_model(ckpt.model)
    ms = ckpt.mindskip(base)          # the routers attached, or fresh ones when there are none

The routers are ``routers`` if given (a missing folder is an error), else the run's own
``<run>/train/routers`` (notebook 01); when that folder does not exist the step is refused
unless ``fresh_routers=True`` asks for fresh zero-initialised routers (whose results are labelled
``mindskip_fresh``, never read as tuned MindSkip). The base model is
``model`` if given, else the one notebook 01 tuned (``run.json``), else the one the routers were
saved from (their ``base_model``), else the embedded default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Checkpoint:
    """The run folder, base model and router checkpoint of one step."""

    run_dir: Path
    model: str  # embedded kit name, local folder or Hugging Face id (rt_lib.assets.loading.load_model)
    routers: Path | None  # router checkpoint folder; None: fresh zero-initialised routers

    def mindskip(self, base):
        """``base`` with these routers attached (``attach_routers``)."""
        return attach_routers(base, self.routers)

    def __str__(self) -> str:
        routers = self.routers if self.routers is not None else "(none: fresh zero-init routers)"
        return f"run folder {self.run_dir}\nmodel {self.model}\nrouters {routers}"


def attach_routers(base, routers: str | os.PathLike | None):
    """The ``MindSkipModel`` of ``base`` with the router checkpoint ``routers`` attached
    (``MindSkipModel.from_pretrained``, which refuses routers tuned for another model), or with
    fresh default routers when ``routers`` is None."""
    from rt_lib.mindskip.model import MindSkipModel, get_mindskip_model

    return MindSkipModel.from_pretrained(base, routers) if routers is not None else get_mindskip_model(base)


def resolve_checkpoint(run_dir: str | os.PathLike | None, model: str | None = None,
                       routers: str | os.PathLike | None = None, preset: str | None = None,
                       fresh_routers: bool = False) -> Checkpoint:
    """The checkpoint a step of ``run_dir`` uses (see the module docstring).

    ``run_dir``: the run folder; empty or None creates a new one (``rt_lib.runs.record.new_run``,
    recording the pipeline ``preset``). ``model`` / ``routers``: explicit choices, else looked up. Relative
    paths are relative to the working directory (the kit root when the pipeline runs)."""
    from rt_lib.runs import record as runs
    from rt_lib.mindskip.checkpoint import read_checkpoint_metadata

    run_dir = Path(run_dir) if run_dir else runs.new_run(preset=preset)
    trained = runs.load_run(run_dir).get("parameters", {}).get("train", {})
    if routers and not Path(routers).exists():  # an explicit choice never falls back to fresh routers
        raise FileNotFoundError(
            f"routers={str(routers)!r} does not exist (relative paths start at {Path.cwd()}); pass the folder "
            "written by notebook 01 (<run>/train/routers), or leave routers empty to use this run's own")
    folder = Path(routers) if routers else run_dir / "train" / "routers"
    found = folder if folder.exists() else None
    if found is None and not fresh_routers:
        raise FileNotFoundError(
            f"{folder} does not exist: this run has no tuned routers. Run notebook 01 (step 01) into {run_dir} "
            "first, pass routers=<a router folder>, or set fresh_routers=True to measure untrained "
            "zero-initialised routers (labelled mindskip_fresh in the results)")
    model = (model or trained.get("model")
             or (read_checkpoint_metadata(found).get("base_model") if found is not None else None)
             or DEFAULT_MODEL)
    return Checkpoint(run_dir=run_dir, model=model, routers=found)

"""The profiling step of a run: prompts cut from a text, the profile written to
``<run>/profile/`` (profile.csv, profile.json, the speedup-vs-skip figure) and recorded in
run.json. What is measured and how: ``rt_lib.speed.profiling``.

    from rt_lib.speed import step as profile_step
    from rt_lib.speed import profiling
    rows, conditions, folder = profile_step.run_step(model, tok, "results/runs/<id>",
                                                     profiling.grid("quick"), routers="<router dir>")
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from rt_lib.speed.profiling import COLUMNS, ProfileSettings, profile
from rt_lib.speed.variants import prepare_models


def run_step(model, tokenizer, out, settings: ProfileSettings, routers: str | None = None, config=None,
             text: str | None = "wikipedia-en", grid_name: str | None = None, model_name: str | None = None,
             progress: bool = True):
    """The whole profiling step of a run (CLI and notebook): wrap `model` with the routers (a
    checkpoint folder) or fresh ones (`config`), cut prompts from `text` (None: random ids),
    profile, write `<out>/profile/` and record the step in `<out>/run.json` (created if
    missing). `grid_name`: the name of the grid `settings` came from (recorded). Returns (rows,
    conditions, profile folder)."""
    from rt_lib.runs.record import new_run

    out = Path(out).resolve()
    if not (out / "run.json").exists():
        new_run(root=out.parent, run_id=out.name)
    tokens = text_tokens(tokenizer, text) if text else None
    model_name = model_name or getattr(model.config, "rt_kit_name", None) or model.config.name_or_path
    ms = prepare_models(model, routers, config)
    try:
        t0 = time.perf_counter()
        rows, conditions = profile(ms, settings, tokens, progress=progress)
        describe(conditions, wall_time_s=time.perf_counter() - t0, grid=grid_name, model=model_name,
                 routers=routers, text=text)
    finally:
        ms.unload()  # `model` leaves as it came
    return rows, conditions, record_step(out, rows, conditions)


def describe(conditions: dict, *, wall_time_s: float, grid: str | None, model: str, routers, text: str | None) -> dict:
    """Add what ``profile()`` cannot know to its conditions, in place: the step's wall time,
    grid name (``rt_lib.speed.profiling.PROFILE_GRIDS``), model name, routers (``router_record`` of the checkpoint folder; None: fresh) and
    the text the prompts were cut from (None: random ids). Every profiling step (run_step,
    the evidence run, the GPU check) records these the same way."""
    conditions.update(wall_time_s=round(wall_time_s, 1), grid=grid, model=model,
                      routers=router_record(str(routers) if routers else None), text=text)
    return conditions


def record_step(out, rows: list[dict], conditions: dict) -> Path:
    """Write ``<out>/profile/`` and record the step in ``<out>/run.json``: its options (grid,
    model, dtype, threads, prompt text, the grid settings) as ``parameters.profile``, what it
    measured with (routers, skipped layers) and its files in ``steps.profile``."""
    from rt_lib.runs.record import update_run

    prof = write_results(rows, conditions, out)
    options = {"grid": conditions.get("grid"), "model": conditions.get("model"), "dtype": conditions["dtype"],
               "threads": conditions["threads"], "text": conditions.get("text"), **conditions["settings"]}
    update_run(out, "profile", {"routers": conditions["routers"], "skip_layers": conditions["skip_layers"],
                                "files": ["profile/profile.csv", "profile/profile.json"]}, parameters=options)
    return prof


def text_tokens(tokenizer, name: str, split: str = "validation", max_chars: int = 400_000) -> torch.Tensor:
    """Token ids of the start of a text data set, as one 1-D tensor (prompts are cut from it)."""
    from rt_lib.assets.loading import load_dataset

    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids, n = [], 0
    for t in load_dataset(name, split=split)["text"]:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + sep
        n += len(t)
        if n >= max_chars:
            break
    return torch.tensor(ids, dtype=torch.long)


def router_record(path):
    """Path, weights sha256 and config of a router checkpoint, for profile.json (None: fresh)."""
    if not path:
        return None
    from rt_lib.mindskip.checkpoint import read_checkpoint_metadata

    meta = read_checkpoint_metadata(path)
    return {"path": str(path), "weights_sha256": meta.get("weights_sha256"), "config": meta.get("config")}


def write_results(rows, conditions, out_dir):
    """<out_dir>/profile/{profile.csv, profile.json, speedup_vs_skip.png}; returns the folder."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from rt_lib.plots import plot_speedup_vs_skip, save_figure
    from rt_lib.files import atomic_write_json, write_csv

    prof = Path(out_dir) / "profile"
    prof.mkdir(parents=True, exist_ok=True)
    write_csv(prof / "profile.csv", rows, COLUMNS)
    atomic_write_json(prof / "profile.json", conditions)
    fig = plot_speedup_vs_skip(pd.DataFrame(rows, columns=COLUMNS),
                               title=f"{conditions.get('device')} {conditions.get('dtype')} "
                                     f"threads={conditions.get('threads')}")
    save_figure(fig, prof / "speedup_vs_skip")
    plt.close(fig)
    return prof

"""The paper's tables and figures, rebuilt from result files, with the kit's runs beside them.

Reads only files: the paper's published numbers in ``results/reference/`` and the run
folders ``results/runs/<id>/`` (formats in docs/results_format.md). Writes tables as
Markdown, CSV and LaTeX and figures as PNG and PDF. Nothing here runs a model.

    python -m rt_lib paper --results results

    from rt_lib.paper.build import collect_runs, build_all
    runs = collect_runs("results")        # one tidy row per (run, variant, threshold, task, metric)
    written = build_all("results")        # {"tables": {...}, "figures": {...}, "problems": [...]}

The work is split by job: rt_lib.runs.read reads run folders (and answers which configuration a
step ran with), rt_lib.paper.tidy turns them into one tidy row per operating point
(``collect_runs``), rt_lib.paper.tables builds and writes the tables, rt_lib.paper.figures the
figures; this module runs them all. Which run provides which row is decided by
``collect_runs`` (see its docstring). A cell the kit never measured shows "not run", never a
value borrowed from elsewhere. A run folder with a missing or malformed file, or with stale
results (a step rerun with ``--replace`` after later steps used its results; rt_lib.runs.record), is
named in a warning and in ``problems`` (a stale one with the command that refreshes it) and
left out; every other run still builds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rt_lib.paper.claims import write_claims
from rt_lib.paper.figures import build_evidence_figures, build_figures
from rt_lib.paper.tables import DEFAULT_REFERENCE_DIR, build_tables
from rt_lib.paper.tidy import tidy_runs
from rt_lib.runs.read import load_runs

log = logging.getLogger(__name__)


def build_all(results_root: str | Path = "results", out_tables: str | Path = "results/tables",
              out_figures: str | Path = "results/figures", reference_dir: str | Path | None = None,
              regime: str = "prefill", figures: bool = True, pdf: bool = False) -> dict:
    """Rebuild every table and figure from the files under ``results_root``.

    Returns ``{"tables": {name: [paths]}, "figures": {name: [paths]}, "problems": [lines]}``;
    each problem names a run folder left out and why. ``reference_dir`` defaults to
    ``<results_root>/reference`` when it exists, else the kit's ``results/reference``.
    ``figures=False`` builds the tables only; figures are PNG, and PDF too with ``pdf=True``.
    """
    formats = ("png", "pdf") if pdf else ("png",)
    if reference_dir is None:
        candidate = Path(results_root) / "reference"
        reference_dir = candidate if (candidate / "main_table.csv").is_file() else DEFAULT_REFERENCE_DIR
    runs, problems = load_runs(results_root)
    tidy = tidy_runs(runs, regime)
    tables = build_tables(runs, tidy, out_tables, reference_dir, regime, problems)
    claims_files = write_claims(results_root, out_tables, reference_dir)
    if claims_files:
        tables["claims"] = claims_files
    from rt_lib.evidence.frontier import write_frontier

    frontier = write_frontier(results_root, out_tables, out_figures if figures else None, formats=formats)
    frontier_figure = {"router_frontier": frontier.pop("router_frontier_figure")} if "router_frontier_figure" in frontier else {}
    tables.update(frontier)
    figs = build_figures(runs, tidy, out_figures, reference_dir, problems, formats) if figures else {}
    if figures:
        figs.update(build_evidence_figures(results_root, out_figures, reference_dir, formats))
        figs.update(frontier_figure)
    log.info("built %d tables and %d figures from %d runs", len(tables), len(figs), len(runs))
    return {"tables": tables, "figures": figs, "problems": problems}


def output_folders(run_dir: str | Path = "", results_root: str | Path = "results",
                   tables_dir: str | Path = "results/tables",
                   figures_dir: str | Path = "results/figures") -> tuple[Path, Path, Path]:
    """Where notebook 04 reads and writes, its parameters' empty values filled in:
    ``(results_root, tables_dir, figures_dir)``. An empty ``results_root`` is the folder holding
    ``run_dir``; empty ``tables_dir``/``figures_dir`` are ``<run_dir>/paper/tables`` and
    ``<run_dir>/paper/figures``. ``ValueError`` when an empty one has no ``run_dir`` to come from."""
    if not (tables_dir and figures_dir) and not run_dir:
        raise ValueError("tables_dir/figures_dir may only be empty together with a run_dir")
    if not results_root and not run_dir:
        raise ValueError("results_root may only be empty together with a run_dir")
    return (Path(results_root or Path(run_dir).parent), Path(tables_dir or Path(run_dir) / "paper" / "tables"),
            Path(figures_dir or Path(run_dir) / "paper" / "figures"))


HEADLINE_FIGURES = ("fig2", "router_frontier", "evidence")  # shown first by notebook 04


def figures_to_show(built: dict, run_id: str | None = None) -> tuple[list[Path], list[Path]]:
    """``(shown, listed)``: the PNG figures of ``build_all``'s result that notebook 04 displays
    (the paper's Figure 2, the router frontier, the evidence figures, then the figures of
    ``run_id``) and the others, which it lists by file so the executed notebook stays small."""
    from rt_lib.paper.figures import figure_names

    pngs = sorted(p for ps in built.get("figures", {}).values() for p in ps if Path(p).suffix == ".png")
    own = figure_names([run_id])[run_id] if run_id else None
    shown = [p for p in pngs if p.name.startswith(HEADLINE_FIGURES)]
    shown += [p for p in pngs if own and p not in shown and p.stem.endswith(own)]
    return shown, [p for p in pngs if p not in shown]

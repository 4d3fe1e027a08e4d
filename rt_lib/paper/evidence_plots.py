"""Figures of an evidence run: every kit point with its paired 95% interval.

``plot_evidence_fig2``: accuracy change vs dense against the paper's skip ratio (skipped
attention executions / all layers'), MindSkip and static attention drop, with the paper's
Figure 2 points (change vs its dense point) marked as published. ``plot_task_panels``: the
same per task, with each task's majority-class rate. ``plot_heldout``: held-out loss change
vs dense against the skip ratio, for every routing granularity and level.

Inputs are the tables of ``rt_lib.evaluation.measures`` (``measures.csv``, ``heldout.csv``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from rt_lib.evaluation.measures import MACRO
from rt_lib.plots import METHOD_STYLE, OKABE_ITO, styled, new_figure, percent_axis

PUBLISHED = dict(marker="o", markerfacecolor="none", linestyle=":", alpha=0.8)
GRANULARITY_STYLE = {"attn": OKABE_ITO["blue"], "mlp": OKABE_ITO["green"], "block": OKABE_ITO["purple"]}


def _errorbars(ax, d: pd.DataFrame, x: str, y: str, lo: str, hi: str, scale: float, style: dict, label: str,
               line: bool = True) -> None:
    d = d.sort_values(x)
    yv = scale * d[y].to_numpy(float)
    err = np.vstack([yv - scale * d[lo].to_numpy(float), scale * d[hi].to_numpy(float) - yv])
    ax.errorbar(d[x], yv, yerr=err, color=style["color"], marker=style["marker"], label=label, capsize=3,
                linestyle="-" if line and len(d) > 1 else "none")


@styled
def plot_evidence_fig2(measures: pd.DataFrame, published: pd.DataFrame | None = None,
                       title: str = "") -> Figure:
    """Macro accuracy change vs dense (points) against the paper's skip ratio, with intervals."""
    fig, axes = new_figure(1, 1, size=(6.4, 4.4))
    ax = axes[0, 0]
    ax.axhline(0.0, color=METHOD_STYLE["dense"]["color"], linewidth=1, label="dense")
    m = measures[measures.task == MACRO]
    for method in ("mindskip", "static_drop"):
        d = m[(m.method == method) & m.k.notna()] if method == "mindskip" else m[m.method == method]
        if len(d):
            _errorbars(ax, d, "skip_ratio", "acc_diff", "acc_ci_low", "acc_ci_high", 100, METHOD_STYLE[method],
                       f"{METHOD_STYLE[method]['label']} (kit, 95% CI)")
    own = m[(m.method == "mindskip") & m.k.isna()]
    if len(own):
        _errorbars(ax, own, "skip_ratio", "acc_diff", "acc_ci_low", "acc_ci_high", 100,
                   dict(color=OKABE_ITO["sky_blue"], marker="D"), "MindSkip at its own threshold (kit)", line=False)
    if published is not None and len(published):
        base = float(published[published.method == "dense"].performance.iloc[0])
        for method in ("mindskip", "static_drop"):
            p = published[published.method == method].sort_values("skip_ratio")
            ax.plot(p.skip_ratio, p.performance - base, color=METHOD_STYLE[method]["color"], **PUBLISHED,
                    label=f"{METHOD_STYLE[method]['label']} (published, paper Fig. 2)")
    percent_axis(ax.xaxis)
    ax.set(xlabel="skip ratio (skipped attention sublayers / all layers)",
           ylabel="accuracy change vs dense (points, macro)", title=title)
    ax.legend(loc="lower left", fontsize=7)
    return fig


@styled
def plot_task_panels(measures: pd.DataFrame, title: str = "") -> Figure:
    """One panel per task: accuracy change vs dense of every variant, with its interval."""
    tasks = [t for t in dict.fromkeys(measures.task) if not str(t).startswith("macro")]
    ncols = 4
    nrows = int(np.ceil(len(tasks) / ncols)) or 1
    fig, axes = new_figure(nrows, ncols, size=(3.2 * ncols, 2.8 * nrows), sharex=True)
    for i, task in enumerate(tasks):
        ax = axes[i // ncols, i % ncols]
        d = measures[measures.task == task]
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        for method in ("mindskip", "static_drop"):
            dm = d[d.method == method]
            if len(dm):
                _errorbars(ax, dm, "skip_ratio", "acc_diff", "acc_ci_low", "acc_ci_high", 100, METHOD_STYLE[method],
                           METHOD_STYLE[method]["label"], line=False)
        r = d.iloc[0]
        chance = "" if r.above_chance else ", dense not above majority"
        ax.set_title(f"{task} (n={int(r.n)}; dense {100 * r.dense_value:.1f}, majority "
                     f"{100 * r.majority_rate:.1f}{chance})", fontsize=7)
        percent_axis(ax.xaxis)
    for j in range(len(tasks), nrows * ncols):
        axes[j // ncols, j % ncols].set_visible(False)
    axes[0, 0].legend(fontsize=6, loc="lower left")
    fig.supxlabel("skip ratio (of all layers)")
    fig.supylabel("accuracy change vs dense (points, 95% CI)")
    if title:
        fig.suptitle(title)
    return fig


@styled
def plot_heldout(heldout: pd.DataFrame, title: str = "") -> Figure:
    """Held-out loss change vs dense against skip ratio, by granularity and routing level."""
    fig, axes = new_figure(1, 1, size=(6.4, 4.4))
    ax = axes[0, 0]
    d = heldout[heldout.variant != "dense"].copy()
    for (method, gran, level), g in d.groupby([d.method, d.granularity.fillna("attn"), d.route_level.fillna("-")],
                                              sort=False):
        if method == "static_drop":
            style, label = METHOD_STYLE["static_drop"], "static attention drop"
        else:
            style = dict(color=GRANULARITY_STYLE.get(gran, "0.4"), marker="o" if level == "seq" else "^")
            label = f"MindSkip {gran}/{level}"
        _errorbars(ax, g, "skip_ratio", "loss_diff", "ci_low", "ci_high", 1.0, style, label, line=False)
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    percent_axis(ax.xaxis)
    ax.set(xlabel="skip ratio (skipped sublayers / all layers)", ylabel="held-out loss change vs dense (nats/token)",
           title=title)
    ax.legend(fontsize=7)
    return fig

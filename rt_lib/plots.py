"""Figure style and the kit's plot functions (used by rt_lib.paper.build and by the notebooks).

Every function takes plain data (a DataFrame or a CSV path in the formats of
docs/results_format.md) and returns a ``matplotlib.figure.Figure``. None touches global
pyplot state or ``matplotlib.rcParams``: the kit's style applies only while a figure is made,
drawn and saved (``matplotlib.rc_context``), so a notebook shows the returned figure, its own
plots keep their style, and a batch build can make hundreds without leaking memory.
``save_figure`` writes PNG and PDF side by side.

    from rt_lib import plots
    fig = plots.plot_training_curves("results/runs/<id>/train/log.csv", capacity_target=0.5)
    plots.save_figure(fig, "results/figures/training_curves_<id>")
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Iterable

import matplotlib

# Headless machines (CI, the batch runner) have no display: use Agg there. Leave any backend
# chosen by the user or by Jupyter (MPLBACKEND / ipykernel) alone.
if not os.environ.get("DISPLAY") and not os.environ.get("MPLBACKEND") and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

# Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}
PALETTE = [OKABE_ITO[k] for k in ("blue", "vermillion", "green", "orange", "purple", "sky_blue", "yellow", "black")]

# One colour and marker per method, the same in every figure.
METHOD_STYLE = {
    "dense": dict(color=OKABE_ITO["black"], marker="s", label="dense"),
    "mindskip": dict(color=OKABE_ITO["blue"], marker="o", label="MindSkip"),
    "static_drop": dict(color=OKABE_ITO["vermillion"], marker="v", label="static attention drop"),
    "mindskip_forced": dict(color=OKABE_ITO["sky_blue"], marker="P", label="MindSkip, forced decisions"),
    "oracle": dict(color=OKABE_ITO["green"], marker="D", label="oracle (layers removed)"),
    "mask": dict(color=OKABE_ITO["purple"], marker="x", label="mask only (computes all)"),
    "bound": dict(color=OKABE_ITO["orange"], marker="+", label="measured bound"),
}
SEQUENTIAL_CMAP = "viridis"  # perceptually uniform and colour-blind safe

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
    "lines.linewidth": 1.8,
    "lines.markersize": 6,
    "legend.frameon": False,
    "pdf.fonttype": 42,  # embed TrueType: text stays editable/searchable in the PDF
    "ps.fonttype": 42,
    "image.cmap": SEQUENTIAL_CMAP,
}


def apply_style() -> None:
    """Set the kit's figure style globally, for figures drawn with pyplot in a notebook.

    The kit's own plot functions do not need it: they apply ``STYLE`` only while they build,
    draw and save a figure (``style``) and leave the global ``matplotlib.rcParams`` as found.
    """
    matplotlib.rcParams.update(STYLE)


def style():
    """Context manager: the kit's figure style (fonts, grid, colour-blind-safe colour cycle)
    for what is made or drawn inside it; ``matplotlib.rcParams`` is restored on exit."""
    return matplotlib.rc_context(STYLE)


def styled(plot):
    """Build a figure under ``style()``."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with style():
            return plot(*args, **kwargs)
    return wrapper


class _KitFigure(Figure):
    """A Figure that is drawn under the kit's style wherever it is rendered (``save_figure``, a
    notebook's inline display): some artists, such as ticks, are made only when drawn."""

    def draw(self, renderer):
        with style():
            return super().draw(renderer)

    def _repr_png_(self) -> bytes:
        """The figure as a PNG: what a notebook shows for a cell that ends with it or ``display(fig)``
        (the kit draws on plain Figures, which pyplot's inline backend does not display)."""
        import io

        buf = io.BytesIO()
        with style():
            self.savefig(buf, format="png")
        return buf.getvalue()


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (6.0, 4.0), **kw):
    fig = _KitFigure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


FORMATS = ("png",)  # what every figure is saved as; PDF on request (``formats=("png", "pdf")``, ``paper --pdf``)


def save_figure(fig: Figure, path_without_ext: str | os.PathLike, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write ``fig`` as ``<path>.png`` (and ``<path>.pdf`` when ``formats`` asks for it; folders
    created); return the paths.

    PDFs carry no creation date so that rebuilding an unchanged figure gives the same file.
    """
    base = Path(path_without_ext)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    with style():  # savefig.dpi and the PDF font type are read when saving
        for ext in formats:
            path = base.with_name(base.name + "." + ext)
            metadata = {"CreationDate": None} if ext == "pdf" else None
            fig.savefig(path, format=ext, metadata=metadata)
            out.append(path)
    return out


def _read(data) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame):
        return data
    return pd.read_csv(data)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    # tick_params, not set_*ticks: shared axes must keep their ticks in the other panels
    ax.tick_params(left=False, bottom=False, labelleft=False, labelbottom=False)
    ax.grid(False)


def percent_axis(axis) -> None:
    axis.set_major_formatter(matplotlib.ticker.PercentFormatter(xmax=1.0, decimals=1))


# ---------------------------------------------------------------------------- training
_CAP_COL = re.compile(r"^capacity_L(\d+)$")


@styled
def plot_training_curves(log_csv_or_df, capacity_target: float | None = 0.5, title: str | None = None) -> Figure:
    """Router-Tuning log (train/log.csv): losses, regulariser, capacity per layer vs step.

    Left: total and LM loss. Middle: the capacity regulariser. Right: mean capacity (thick)
    and each routed layer's capacity (thin, coloured by depth) with the target ``s`` dashed.
    """
    df = _read(log_csv_or_df).sort_values("step")
    fig, axes = new_figure(1, 3, size=(13.0, 3.8))
    ax_loss, ax_reg, ax_cap = axes[0]
    step = df["step"]
    for col, style in (("loss", "-"), ("lm_loss", "--")):
        if col in df:
            ax_loss.plot(step, df[col], style, label=col.replace("_", " "))
    ax_loss.set(xlabel="optimiser step", ylabel="loss", title="loss")
    ax_loss.legend()
    if "reg_loss" in df:
        ax_reg.plot(step, df["reg_loss"], color=OKABE_ITO["vermillion"])
    ax_reg.set(xlabel="optimiser step", ylabel="λ · Σ ReLU(capacity − s)", title="capacity regulariser")

    layer_cols = sorted((int(m.group(1)), c) for c in df.columns if (m := _CAP_COL.match(c)))
    if layer_cols:
        cmap = colormaps[SEQUENTIAL_CMAP]
        lo, hi = layer_cols[0][0], layer_cols[-1][0]
        norm = matplotlib.colors.Normalize(vmin=lo, vmax=max(hi, lo + 1))
        for layer, col in layer_cols:
            ax_cap.plot(step, df[col], color=cmap(norm(layer)), linewidth=0.9, alpha=0.8)
        sm = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(sm, ax=ax_cap, label="routed layer", pad=0.01)
    if "mean_capacity" in df:
        ax_cap.plot(step, df["mean_capacity"], color=OKABE_ITO["black"], linewidth=2.6, label="mean capacity")
    if capacity_target is not None:
        ax_cap.axhline(capacity_target, color=OKABE_ITO["vermillion"], linestyle="--", linewidth=1.4,
                       label=f"target s = {capacity_target:g}")
    ax_cap.set(xlabel="optimiser step", ylabel="capacity (fraction executed)", title="capacity", ylim=(-0.02, 1.02))
    ax_cap.legend(loc="lower left")
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------- capacity heatmap
@styled
def plot_capacity_heatmap(df: pd.DataFrame, title: str | None = None, annotate: bool | None = None) -> Figure:
    """Executed fraction per routed layer (rows) and task (columns), from eval/skip_stats.csv.

    ``df`` holds one variant's rows (columns ``task, layer, executed_fraction``); repeated
    (task, layer) pairs are averaged. A last column ``mean`` averages over tasks.
    """
    table = df.pivot_table(index="layer", columns="task", values="executed_fraction", aggfunc="mean").sort_index()
    table["mean"] = table.mean(axis=1)
    n_layers, n_tasks = table.shape
    fig, axes = new_figure(size=(1.4 + 0.95 * n_tasks, 1.3 + 0.32 * n_layers))
    ax = axes[0, 0]
    im = ax.imshow(table.to_numpy(dtype=float), aspect="auto", cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n_tasks), [str(c) for c in table.columns], rotation=30, ha="right")
    ax.set_yticks(range(n_layers), [f"{i:g}" if isinstance(i, (int, float)) else str(i) for i in table.index])
    ax.axvline(n_tasks - 1.5, color="white", linewidth=2)
    ax.set(xlabel="task", ylabel="layer")
    ax.grid(False)
    if annotate is None:
        annotate = n_layers * n_tasks <= 200
    if annotate:
        values = table.to_numpy(dtype=float)
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="executed fraction", pad=0.01)
    ax.set_title(title or "executed fraction of routed sublayers")
    return fig


# ---------------------------------------------------------------------------- speedup
def _config_key(df: pd.DataFrame) -> pd.Series:
    """Rows of one configuration: mindskip/mask by threshold, removal variants by skip ratio."""
    thr = df["threshold"] if "threshold" in df else pd.Series(np.nan, index=df.index)
    by_thr = df["variant"].isin(["mindskip", "mask"]) & thr.notna()
    return np.where(by_thr, "t" + thr.astype(str), "s" + df["skip_ratio"].round(3).astype(str))


@styled
def plot_speedup_vs_skip(profile_df, title: str | None = None) -> Figure:
    """Measured speedup vs realised skip ratio per regime (profile/profile.csv).

    Points: median over the grid (batch, length) of each variant/configuration, whiskers from
    the smallest to the largest grid point. The measured bound (``bound_speedup``: what
    removing the skipped sublayers could save at most) is drawn as a line; the dense model
    sits at 1.
    """
    df = _read(profile_df)
    if "status" in df:
        df = df[df["status"].fillna("ok") == "ok"]
    df = df.dropna(subset=["speedup", "skip_ratio"])
    regimes = [r for r in ("prefill", "decode") if r in set(df["regime"])] or ["prefill"]
    fig, axes = new_figure(1, len(regimes), size=(5.2 * len(regimes), 4.0), sharey=True)
    for ax, regime in zip(axes[0], regimes):
        d = d_all = df[df["regime"] == regime].copy()
        if d.empty:
            _no_data(ax, f"no {regime} measurements")
            continue
        d["config"] = _config_key(d)
        bound = d_all.groupby(d_all["skip_ratio"].round(3))["bound_speedup"].median().dropna().sort_index()
        if not bound.empty:
            xs = np.r_[0.0, bound.index.to_numpy()] if bound.index.min() > 0 else bound.index.to_numpy()
            ys = np.r_[1.0, bound.to_numpy()] if bound.index.min() > 0 else bound.to_numpy()
            st = METHOD_STYLE["bound"]
            ax.plot(xs, ys, linestyle="--", color=st["color"], marker=st["marker"], markersize=8, label=st["label"])
        ax.axhline(1.0, color="0.5", linewidth=1, linestyle=":")
        for variant, dv in d.groupby("variant", sort=False):
            agg = dv.groupby("config").agg(x=("skip_ratio", "median"), y=("speedup", "median"),
                                           lo=("speedup", "min"), hi=("speedup", "max")).sort_values("x")
            st = METHOD_STYLE.get(variant, dict(color=None, marker="o", label=variant))
            ax.errorbar(agg["x"], agg["y"], yerr=[agg["y"] - agg["lo"], agg["hi"] - agg["y"]], linestyle="-" if len(agg) > 1 else "none",
                        color=st["color"], marker=st["marker"], label=st["label"], capsize=3)
        percent_axis(ax.xaxis)
        ax.set(xlabel="skip ratio (routed sublayer executions skipped)", title=f"{regime}")
        ax.set_xlim(left=-0.02)
    axes[0, 0].set_ylabel("speedup over dense (×)")
    axes[0, -1].legend(loc="upper left")
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------- accuracy vs speedup
def pareto_front(x: Iterable[float], y: Iterable[float]) -> np.ndarray:
    """Indices of the points no other point beats in both x and y (higher is better), by x."""
    x, y = np.asarray(list(x), dtype=float), np.asarray(list(y), dtype=float)
    ok = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    order = ok[np.lexsort((-y[ok], -x[ok]))]  # x descending, ties: best y first
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.array(sorted(front, key=lambda i: x[i]), dtype=int)


@styled
def plot_accuracy_vs_speedup(df: pd.DataFrame, title: str | None = None, accuracy_label: str = "average accuracy (%)") -> Figure:
    """Accuracy against realised skip ratio (left) and measured speedup (right).

    ``df``: one row per operating point with ``method`` (dense, mindskip, static_drop),
    ``accuracy`` (percent), ``skip_ratio`` and ``speedup`` (may be missing: the point then only
    appears on the left), optional ``threshold`` (labelled). Each method is a curve over its
    operating points; the grey step line is the Pareto front over all methods. Optional
    ``ci_low``/``ci_high`` (percent) draw each point's paired 95% interval: the interval of its
    difference to dense, drawn around its accuracy (the legend says so).
    """
    df = df.copy()
    for col in ("skip_ratio", "speedup", "threshold"):
        if col not in df:
            df[col] = np.nan
    df.loc[df["method"] == "dense", "skip_ratio"] = df.loc[df["method"] == "dense", "skip_ratio"].fillna(0.0)
    fig, axes = new_figure(1, 2, size=(11.0, 4.2), sharey=True)
    bars = False
    for ax, xcol, xlabel in ((axes[0, 0], "skip_ratio", "realised skip ratio (of all layers)"),
                             (axes[0, 1], "speedup", "measured speedup over dense (×)")):
        d = df.dropna(subset=[xcol, "accuracy"])
        if d.empty:
            _no_data(ax, "not run: no profile measurement\nat these operating points")
            ax.set_xlabel(xlabel)
            continue
        for method, dm in d.groupby("method", sort=False):
            dm = dm.sort_values(xcol)
            st = METHOD_STYLE.get(method, dict(color=None, marker="o", label=method))
            ax.plot(dm[xcol], dm["accuracy"], color=st["color"], marker=st["marker"], label=st["label"],
                    linestyle="-" if len(dm) > 1 else "none")
            bars = _paired_bars(ax, dm, xcol, "accuracy", st["color"]) or bars
            for _, r in dm.iterrows():
                if pd.notna(r["threshold"]):
                    ax.annotate(f"τ={r['threshold']:g}", (r[xcol], r["accuracy"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=st["color"])
        front = d.iloc[pareto_front(d[xcol], d["accuracy"])]
        if len(front) > 1:
            ax.step(front[xcol], front["accuracy"], where="post", color="0.6", linewidth=4, alpha=0.35,
                    zorder=0, label="Pareto front")
        if xcol == "skip_ratio":
            percent_axis(ax.xaxis)
        ax.set_xlabel(xlabel)
    axes[0, 0].set_ylabel(accuracy_label)
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if bars:
        handles, labels = _with_bars_entry(handles, labels)
    if handles:
        axes[0, 1].legend(handles, labels, loc="lower left", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


# What the whiskers of ``_paired_bars`` are: the interval of a paired difference, not of the score
PAIRED_BARS_LABEL = "whiskers: 95% CI of the paired difference\nto dense (same documents), around the score"


def _paired_bars(ax, d: pd.DataFrame, x: str, y: str, color) -> bool:
    """Whiskers of each point's paired 95% interval (columns ``ci_low``/``ci_high``, in the
    units of ``y``: the interval of the point's paired difference to dense, shifted onto its
    score), where the frame has them; points without one (dense) get none. True when any
    was drawn: the legend then says what they are (``_with_bars_entry``)."""
    if "ci_low" not in d or "ci_high" not in d:
        return False
    d = d.dropna(subset=["ci_low", "ci_high"])
    if len(d):
        ax.errorbar(d[x], d[y], yerr=[d[y] - d["ci_low"], d["ci_high"] - d[y]], fmt="none", ecolor=color,
                    capsize=3, linewidth=1)
    return bool(len(d))


def _with_bars_entry(handles: list, labels: list) -> tuple[list, list]:
    """Legend entries plus one saying what ``_paired_bars``' whiskers are."""
    from matplotlib.lines import Line2D

    whisker = Line2D([], [], color="0.35", marker="|", markersize=12, markeredgewidth=1.2, linestyle="none")
    return [*handles, whisker], [*labels, PAIRED_BARS_LABEL]


# ---------------------------------------------------------------------------- Figure 2
def _drop_panel(ax, df: pd.DataFrame, title: str) -> None:
    base = df[df["method"] == "dense"]
    bars = False
    for method in ("static_drop", "mindskip"):
        d = pd.concat([base, df[df["method"] == method]]).sort_values("skip_ratio")
        if len(d) == len(base):
            continue
        st = METHOD_STYLE[method]
        ax.plot(d["skip_ratio"], d["performance"], color=st["color"], marker=st["marker"], label=st["label"])
        bars = _paired_bars(ax, d, "skip_ratio", "performance", st["color"]) or bars
        for _, r in d[d["method"] == method].iterrows():
            ax.annotate(f"{r['performance']:.1f}", (r["skip_ratio"], r["performance"]), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=8, color=st["color"])
    if not base.empty:
        st = METHOD_STYLE["dense"]
        ax.plot(base["skip_ratio"], base["performance"], linestyle="none", color=st["color"], marker=st["marker"],
                markersize=8, label="dense (no skipping)", zorder=3)
        for _, r in base.iterrows():
            ax.annotate(f"{r['performance']:.1f}", (r["skip_ratio"], r["performance"]), textcoords="offset points",
                        xytext=(0, 7), ha="center", fontsize=8, color=st["color"])
    percent_axis(ax.xaxis)
    ax.set(xlabel="skip ratio (skipped attention sublayers / all layers)", title=title)
    ax.margins(x=0.08, y=0.15)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(*(_with_bars_entry(handles, labels) if bars else (handles, labels)), loc="lower left",
              fontsize="small")


@styled
def plot_drop_vs_mindskip(ref_df: pd.DataFrame, kit_df: pd.DataFrame | None = None,
                          kit_title: str = "rt-kit (measured)") -> Figure:
    """The paper's Figure 2 (static attention drop vs MindSkip) with the kit's curve beside it.

    Both frames have ``skip_ratio`` (fraction), ``method`` (``dense``, ``static_drop``,
    ``mindskip``; the published frame as ``rt_lib.paper.tables.load_reference`` translates it)
    and ``performance`` (percent); the skip ratio is of all layers in both (the paper's 12.5% and
    25%). The panels have separate y axes: the paper's model and task set are not stated, the
    kit's are in ``kit_title``. The kit's optional ``ci_low``/``ci_high`` are each point's paired
    95% interval of its difference to dense, drawn around its accuracy (the legend says so).
    """
    n = 1 if kit_df is None else 2
    fig, axes = new_figure(1, n, size=(5.4 * n, 4.0))
    _drop_panel(axes[0, 0], ref_df, "paper, Figure 2 (read off the chart, ±0.3)")
    axes[0, 0].set_ylabel("average performance (%)")
    if kit_df is not None:
        if kit_df.empty:
            _no_data(axes[0, 1], "not run")
            axes[0, 1].set_title(kit_title)
        else:
            _drop_panel(axes[0, 1], kit_df, kit_title)
            axes[0, 1].set_ylabel("average accuracy (%)")
    return fig


# ---------------------------------------------------------------------------- MoE expert load
@styled
def plot_expert_load(data, title: str | None = None) -> Figure:
    """Tokens each expert is assigned vs tokens it executes under MindSkip (the rows of
    ``rt_lib.speed.moe_load.expert_load``: ``layer, expert, routed, assigned, routed_assigned,
    executed``), summed over the routed layers (over every MoE layer when none is routed).

    Light bars: assigned in the dense pass; dark bars: executed; ticks: what the expert router
    assigns on the MindSkip pass's own inputs (skipped tokens included), which bounds the
    executed count per expert.
    """
    df = _read(pd.DataFrame(data) if isinstance(data, list) else data)
    n_experts = df["expert"].nunique() if not df.empty else 0
    fig, axes = new_figure(size=(max(6.0, 1.5 + 0.12 * n_experts), 4.0))
    ax = axes[0, 0]
    if df.empty:
        _no_data(ax, "no MoE layer")
        return fig
    routed = df[df["routed"].astype(bool)] if df["routed"].astype(bool).any() else df
    per = routed.groupby("expert")[["assigned", "routed_assigned", "executed"]].sum().sort_index()
    x = per.index.to_numpy()
    ax.bar(x, per["assigned"], width=0.85, color=OKABE_ITO["sky_blue"], alpha=0.55, label="assigned (dense pass)")
    ax.bar(x, per["executed"], width=0.5, color=OKABE_ITO["blue"], label="executed (MindSkip)")
    ax.scatter(x, per["routed_assigned"], marker="_", s=80, color=OKABE_ITO["black"], zorder=3,
               label="assigned on MindSkip's inputs")
    layers = sorted(routed["layer"].unique())
    span = f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers ({layers[0]}..{layers[-1]})"
    total_a, total_e = int(per["assigned"].sum()), int(per["executed"].sum())
    share = f", {total_e / total_a:.0%} executed" if total_a else ""
    ax.set(xlabel="expert", ylabel="tokens (summed over layers)",
           title=title or f"expert load, {span}{share}")
    ax.margins(x=0.01)
    top = float(per[["assigned", "routed_assigned", "executed"]].to_numpy().max())
    ax.set_ylim(0, 1.25 * top if top > 0 else 1.0)  # room for the legend above the bars
    ax.legend(loc="upper center", ncol=3, fontsize="small")
    return fig

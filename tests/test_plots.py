"""rt_lib.plots: style, PNG+PDF output, and what each plot function draws (fixture data)."""

import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from rt_lib import plots

RUN = Path(__file__).parent / "fixtures" / "runs" / "fixture-attn-seq"


@pytest.mark.skipif(bool(os.environ.get("DISPLAY") or os.environ.get("MPLBACKEND")), reason="a display or backend is set")
def test_headless_backend_is_agg():
    assert matplotlib.get_backend().lower() == "agg"


def test_apply_style_sets_colour_blind_safe_cycle():
    plots.apply_style()
    cycle = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
    assert cycle[:3] == [plots.OKABE_ITO["blue"], plots.OKABE_ITO["vermillion"], plots.OKABE_ITO["green"]]
    assert matplotlib.rcParams["pdf.fonttype"] == 42
    assert matplotlib.rcParams["font.size"] >= 9


def test_plot_functions_leave_global_rcparams_alone_and_style_their_own_figures(tmp_path):
    with matplotlib.rc_context({"font.size": 13.0, "axes.grid": False}):
        before = dict(matplotlib.rcParams)
        fig = plots.plot_training_curves(RUN / "train" / "log.csv", capacity_target=0.5)
        plots.save_figure(fig, tmp_path / "curves")
        assert dict(matplotlib.rcParams) == before
    ax = fig.axes[0]
    assert ax.title.get_fontsize() == plots.STYLE["axes.titlesize"]  # made under the kit's style
    assert not ax.spines["top"].get_visible() and ax.xaxis.get_gridlines()[0].get_visible()
    labels = ax.get_xticklabels()  # ticks made while drawing (saving) use the style too
    assert labels and all(t.get_fontsize() == plots.STYLE["xtick.labelsize"] for t in labels)


def test_style_context_restores_rcparams():
    old = matplotlib.rcParams["font.size"]
    with plots.style():
        assert matplotlib.rcParams["font.size"] == plots.STYLE["font.size"]
        assert matplotlib.rcParams["pdf.fonttype"] == 42
    assert matplotlib.rcParams["font.size"] == old


def test_save_figure_writes_png_and_pdf_on_request(tmp_path):
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    assert [p.name for p in plots.save_figure(fig, tmp_path / "png" / "figure")] == ["figure.png"]
    paths = plots.save_figure(fig, tmp_path / "sub" / "figure", formats=("png", "pdf"))
    assert [p.name for p in paths] == ["figure.png", "figure.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    again = tmp_path / "again"
    plots.save_figure(fig, again, formats=("pdf",))
    assert (tmp_path / "again.pdf").read_bytes() == paths[1].read_bytes()  # no timestamp inside


def test_training_curves_draw_every_layer_and_the_target():
    fig = plots.plot_training_curves(RUN / "train" / "log.csv", capacity_target=0.5)
    assert isinstance(fig, Figure)
    loss_ax, reg_ax, cap_ax = fig.axes[:3]
    assert {ln.get_label() for ln in loss_ax.get_lines()} == {"loss", "lm loss"}
    log = pd.read_csv(RUN / "train" / "log.csv")
    n_layers = sum(c.startswith("capacity_L") for c in log.columns)
    lines = cap_ax.get_lines()
    assert len(lines) == n_layers + 2  # per layer, mean, target
    target = [ln for ln in lines if ln.get_label().startswith("target")][0]
    assert set(target.get_ydata()) == {0.5}
    mean = [ln for ln in lines if ln.get_label() == "mean capacity"][0]
    np.testing.assert_allclose(mean.get_ydata(), log["mean_capacity"])
    assert len(fig.axes) == 4  # three panels + the layer colour bar


def test_capacity_heatmap_is_layer_by_task():
    ss = pd.read_csv(RUN / "eval" / "skip_stats.csv")
    ss = ss[(ss["variant"] == "mindskip") & (ss["threshold"] == 0.5)]
    fig = plots.plot_capacity_heatmap(ss)
    ax = fig.axes[0]
    data = ax.get_images()[0].get_array()
    tasks = sorted(ss["task"].unique())
    assert data.shape == (ss["layer"].nunique(), len(tasks) + 1)  # + mean column
    assert [t.get_text() for t in ax.get_xticklabels()] == [*tasks, "mean"]
    assert [t.get_text() for t in ax.get_yticklabels()][0] == "21"
    expected = ss[(ss["task"] == "boolq") & (ss["layer"] == 21)]["executed_fraction"].iloc[0]
    assert data[0, tasks.index("boolq")] == pytest.approx(expected)


def test_speedup_vs_skip_ignores_skipped_rows_and_draws_the_bound():
    prof = pd.read_csv(RUN / "profile" / "profile.csv")
    assert (prof["status"] == "skipped").any()
    fig = plots.plot_speedup_vs_skip(prof)
    prefill, decode = fig.axes
    assert (prefill.get_title(), decode.get_title()) == ("prefill", "decode")
    labels = {t.get_text() for t in decode.get_legend().get_texts()}
    assert {"measured bound", "MindSkip", "oracle (layers removed)", "mask only (computes all)",
            "static attention drop"} <= labels
    bound = [ln for ln in prefill.get_lines() if ln.get_label() == "measured bound"][0]
    assert bound.get_xdata()[0] == 0.0 and bound.get_ydata()[0] == 1.0
    assert max(bound.get_ydata()) == pytest.approx(prof["bound_speedup"].max())


def test_pareto_front():
    x = [1.0, 1.05, 1.05, 1.10, 1.02]
    y = [56.0, 55.0, 54.0, 52.0, 53.0]
    assert plots.pareto_front(x, y).tolist() == [0, 1, 3]
    assert plots.pareto_front([1.0, np.nan], [50.0, 60.0]).tolist() == [0]


def test_accuracy_vs_speedup_two_panels_and_missing_speedup():
    df = pd.DataFrame({"method": ["dense", "mindskip", "mindskip", "static_drop"],
                       "threshold": [np.nan, 0.5, 0.6, np.nan], "skip_ratio": [0.0, 0.27, 0.41, 0.25],
                       "speedup": [1.0, 1.05, np.nan, 1.06], "accuracy": [55.9, 55.0, 52.9, 51.9]})
    fig = plots.plot_accuracy_vs_speedup(df)
    left, right = fig.axes
    ms_left = [ln for ln in left.get_lines() if ln.get_label() == "MindSkip"][0]
    ms_right = [ln for ln in right.get_lines() if ln.get_label() == "MindSkip"][0]
    assert len(ms_left.get_xdata()) == 2 and len(ms_right.get_xdata()) == 1  # tau=0.6 has no speedup
    nothing = plots.plot_accuracy_vs_speedup(df.assign(speedup=np.nan))
    assert any("not run" in t.get_text() for t in nothing.axes[1].texts)
    assert nothing.axes[0].get_yticklabels()  # the shared y axis keeps its ticks


def test_drop_vs_mindskip_reference_and_kit_panels():
    from rt_lib.paper.tables import load_reference

    ref = load_reference("drop_vs_mindskip")  # the paper's method names translated to the kit's
    one = plots.plot_drop_vs_mindskip(ref)
    assert len(one.axes) == 1
    drop = [ln for ln in one.axes[0].get_lines() if ln.get_label() == "static attention drop"][0]
    assert drop.get_xdata().tolist() == [0.0, 0.125, 0.25]
    assert drop.get_ydata().tolist() == [50.3, 43.4, 38.1]
    kit = pd.DataFrame({"skip_ratio": [0.0, 0.27, 0.25], "method": ["dense", "mindskip", "static_drop"],
                        "performance": [55.9, 55.0, 51.9]})
    two = plots.plot_drop_vs_mindskip(ref, kit, kit_title="kit")
    assert len(two.axes) == 2 and two.axes[1].get_title() == "kit"
    empty = plots.plot_drop_vs_mindskip(ref, kit.iloc[:0])
    assert any("not run" in t.get_text() for t in empty.axes[1].texts)
    # the paper's 12.5% and 25% are of all layers, and so are the kit's skip ratios
    for ax in two.axes:
        assert ax.get_xlabel() == "skip ratio (skipped attention sublayers / all layers)"


def test_paired_whiskers_are_named_in_the_legend():
    """Whiskers drawn around a point's score are the interval of its paired difference to dense:
    the legend says so, on Figure 2's kit panel and on the accuracy-vs-speed figure."""
    from rt_lib.paper.tables import load_reference

    kit = pd.DataFrame({"skip_ratio": [0.0, 0.27, 0.25], "method": ["dense", "mindskip", "static_drop"],
                        "performance": [55.9, 55.0, 51.9], "ci_low": [np.nan, 53.8, 50.0],
                        "ci_high": [np.nan, 56.2, 53.8]})
    fig = plots.plot_drop_vs_mindskip(load_reference("drop_vs_mindskip"), kit)
    paper, measured = (ax.get_legend() for ax in fig.axes)
    assert plots.PAIRED_BARS_LABEL in [t.get_text() for t in measured.get_texts()]
    assert plots.PAIRED_BARS_LABEL not in [t.get_text() for t in paper.get_texts()]  # no whiskers there
    pts = kit.rename(columns={"performance": "accuracy"}).assign(speedup=[1.0, 1.05, 1.06])
    acc = plots.plot_accuracy_vs_speedup(pts)
    assert plots.PAIRED_BARS_LABEL in [t.get_text() for t in acc.axes[1].get_legend().get_texts()]
    assert acc.axes[0].get_xlabel() == "realised skip ratio (of all layers)"


def test_expert_load_sums_the_routed_layers():
    rows = [{"layer": i, "expert": e, "routed": i > 0, "assigned": 10, "routed_assigned": 9 + (i == 2),
             "executed": 4 + e} for i in range(3) for e in range(4)]
    fig = plots.plot_expert_load(rows)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights[:4] == [20, 20, 20, 20]  # assigned, layers 1 and 2 (layer 0 is not routed)
    assert heights[4:] == [8, 10, 12, 14]  # executed
    assert ax.get_title() == "expert load, 2 layers (1..2), 55% executed"
    empty = plots.plot_expert_load(pd.DataFrame(columns=["layer", "expert", "routed", "assigned",
                                                         "routed_assigned", "executed"]))
    assert empty.axes[0].texts[0].get_text() == "no MoE layer"


def test_kit_figures_display_as_png_in_a_notebook():
    fig, axes = plots.new_figure()
    axes[0, 0].plot([0, 1], [1, 0])
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"

"""rt_lib.paper.build: reference data, the run -> row mapping, tables and figures from fixture runs.

Fixture runs (tests/fixtures/runs/, hand-made values) stand in for real results; no model
is loaded. The full build is done once per module into a temporary folder.
"""

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rt_lib.paper import build as paper
from rt_lib.cli import paper as paper_cli
from rt_lib.paper import figures
from rt_lib.paper import tables as paper_tables
from rt_lib.runs import read as rundir
from rt_lib.paper import tidy

FIXTURES = Path(__file__).parent / "fixtures"
RUNS = FIXTURES / "runs"
REF = Path(paper_tables.DEFAULT_REFERENCE_DIR)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    written = paper.build_all(FIXTURES, out / "tables", out / "figures")
    return out, written


def read_table(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / "tables" / f"{name}.csv", na_values=[paper_tables.NOT_RUN])


# ---------------------------------------------------------------------------- reference data
@pytest.mark.parametrize("name,rows", [("main_table", 14), ("lora_table", 8), ("data_ablation", 5),
                                       ("drop_vs_mindskip", 5)])
def test_load_reference_skips_source_comments(name, rows):
    df = paper_tables.load_reference(name)
    assert len(df) == rows
    assert not df.astype(str).apply(lambda c: c.str.startswith("#")).any().any()
    text = (REF / f"{name}.csv").read_text()
    assert text.startswith("# Router-Tuning paper")  # source lines kept in the versioned copy
    assert paper_tables.reference_source(name)[0].startswith("Router-Tuning paper")


def test_reference_readme_names_sources():
    text = (REF / "README.md").read_text()
    for needle in ("2410.13184", "EMNLP 2025", "+-0.3"):
        assert needle in text


def test_reference_values_spot_check():
    main = paper_tables.load_reference("main_table")
    row = main[(main["model"] == "Llama-3-8B") & (main["granularity"] == "attn") & (main["route_level"] == "seq")]
    assert row[["speedup", "arc_c", "avg"]].iloc[0].tolist() == [1.21, 56.6, 69.4]
    fig2 = paper_tables.load_reference("drop_vs_mindskip")
    assert set(fig2["method"]) == {"dense", "static_drop", "mindskip"}  # translated on reading


def test_unknown_reference_name_is_an_error():
    with pytest.raises(ValueError, match="unknown reference"):
        paper_tables.load_reference("table9")


# ---------------------------------------------------------------------------- names
def test_name_mappings():
    assert tidy.paper_task("arc_challenge") == "arc_c"
    assert tidy.paper_task("openbookqa") == "obqa"
    assert tidy.paper_task("arc_easy") == "arc_easy"
    assert rundir.model_name("smollm2-135m-instruct") == "SmolLM2-135M-Instruct"
    assert rundir.model_name("meta-llama/Meta-Llama-3-8B") == "Llama-3-8B"
    assert rundir.model_name("mistralai/Mistral-7B-v0.3") == "Mistral-7B"
    assert rundir.model_name("org/SomeModel-1B") == "SomeModel-1B"
    assert tidy.kit_method("baseline") == "dense"  # the paper's names, read from results/reference
    assert tidy.kit_method("attention-drop") == "static_drop"
    assert tidy.kit_method("router-tuning") == "mindskip"
    assert tidy.kit_method("static_drop") == "static_drop"
    from rt_lib.evaluation.results import legacy_variant_columns

    # files written before results.csv had method/k: the labels give them, once, on reading
    assert legacy_variant_columns("static_drop_k4") == ("static_drop", 4)
    assert legacy_variant_columns("mindskip_t0.5") == ("mindskip", None)
    assert tidy.kit_method("lora+router-tuning") == tidy.kit_method("lora+mindskip") == "lora+mindskip"


# ---------------------------------------------------------------------------- run -> rows
def test_collect_runs_maps_fixture_runs():
    df = tidy.collect_runs(RUNS)
    assert df.attrs["problems"] == []
    assert list(df.columns) == tidy.TIDY_COLUMNS
    assert set(df["run_id"]) == {"fixture-attn-seq", "fixture-block-token", "fixture-lora"}
    assert set(df["model"]) == {"SmolLM2-135M-Instruct"}
    a = df[df["run_id"] == "fixture-attn-seq"]
    ms = a[(a["variant"] == "mindskip") & (a["threshold"] == 0.5) & (a["task"] == "arc_c") & (a["metric"] == "acc_norm")]
    r = ms.iloc[0]
    assert (r["granularity"], r["route_level"], r["method"], r["dataset"]) == ("attn", "seq", "mindskip", "alpaca")
    # written as a fraction of the 8 routed layers, read as a fraction of the model's 30 (train/routers)
    assert r["value"] == pytest.approx(0.36) and r["skip_ratio"] == pytest.approx(0.271 * 8 / 30)
    assert r["speedup"] == pytest.approx(np.median([1.05, 1.06]))  # prefill grid points at tau = 0.5
    assert r["diff"] == pytest.approx(-0.01)  # from eval/paired.csv
    # thresholds that were never profiled have no speedup rather than a borrowed one
    assert a[(a["variant"] == "mindskip") & (a["threshold"] == 0.45)]["speedup"].isna().all()
    drop = a[a["variant"] == "static_drop"]
    assert drop["speedup"].iloc[0] == pytest.approx(np.median([1.054, 1.064]))
    assert drop["granularity"].iloc[0] == "attn" and pd.isna(drop["route_level"].iloc[0])
    assert (a.loc[a["variant"] == "dense", "speedup"] == 1.0).all()
    assert a.loc[a["variant"] == "dense", "granularity"].isna().all()
    assert drop["skip_ratio"].iloc[0] == pytest.approx(2 / 30)  # 2 of 8 routed layers written: 2 of all 30
    b = df[df["run_id"] == "fixture-block-token"]
    assert b["speedup"].isna().all()  # no profile
    assert b["skip_ratio"].isna().all()  # of the routed layers, and no layer count to convert them with
    assert set(b.loc[b["variant"] == "mindskip", "granularity"]) == {"block"}
    c = df[df["run_id"] == "fixture-lora"]
    assert set(c.loc[c["variant"] == "mindskip", "method"]) == {"lora+mindskip"}  # trainable: lora
    assert c.loc[c["variant"] == "mindskip", "speedup"].iloc[0] == pytest.approx(1.048)  # tau from profile.json
    assert c.loc[c["variant"] == "mindskip", "skip_ratio"].iloc[0] == pytest.approx(0.07)  # written of all layers


def test_decode_regime_speedups():
    df = tidy.collect_runs(RUNS, regime="decode")
    r = df[(df["run_id"] == "fixture-attn-seq") & (df["variant"] == "mindskip") & (df["threshold"] == 0.5)]
    assert r["speedup"].iloc[0] == pytest.approx(np.median([1.04, 1.05]))


def test_collect_runs_accepts_results_root_or_runs_folder():
    assert len(tidy.collect_runs(FIXTURES)) == len(tidy.collect_runs(RUNS)) > 0
    assert tidy.collect_runs(FIXTURES / "nothing-here").empty


# ---------------------------------------------------------------------------- build
@pytest.mark.slow
def test_build_all_writes_every_table_and_figure(built):
    out, written = built
    assert written["problems"] == []
    for name in ("main_table", "lora_table", "data_ablation"):
        paths = written["tables"][name]
        assert sorted(p.suffix for p in paths) == [".csv", ".md", ".tex"]
        assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert (out / "tables" / "runs.csv").is_file()
    expected = {
        "fig2_drop_vs_mindskip",
        "training_curves_fixture-attn-seq",
        "capacity_heatmap_fixture-attn-seq", "capacity_heatmap_fixture-block-token", "capacity_heatmap_fixture-lora",
        "speedup_vs_skip_fixture-attn-seq", "speedup_vs_skip_fixture-lora",
        "accuracy_vs_speedup_fixture-attn-seq", "accuracy_vs_speedup_fixture-block-token",
    }
    assert expected <= set(written["figures"])
    for name in expected:
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert not (out / "figures" / f"{name}.pdf").exists(), "PDF only on request"


@pytest.mark.parametrize("name", ["main_table", "lora_table", "data_ablation"])
def test_paper_rows_regenerated_equal_reference(built, name):
    out, _ = built
    table = read_table(out, name)
    got = table[table["source"] == "paper"].reset_index(drop=True)
    ref = paper_tables.load_reference(name)
    assert len(got) == len(ref)
    for col in ref.columns:
        if pd.api.types.is_numeric_dtype(ref[col]):
            np.testing.assert_allclose(got[col].astype(float), ref[col].astype(float), err_msg=col)
        else:
            assert got[col].fillna("").astype(str).tolist() == ref[col].fillna("").astype(str).tolist(), col


def test_kit_rows_are_the_runs_values_in_percent(built):
    out, _ = built
    t = read_table(out, "main_table")
    kit = t[(t["run_id"] == "fixture-attn-seq")]
    tuned = kit[(kit["method"] == "mindskip") & (kit["row"] == "score")]
    # one row per evaluated threshold, each labelled with its own value
    assert tuned["threshold"].tolist() == [0.45, 0.5, 0.55]
    assert tuned["arc_c"].tolist() == [36.5, 36.0, 33.5]
    score = tuned[tuned["threshold"] == 0.5].iloc[0]
    assert score["arc_c"] == 36.0  # acc_norm (the paper's metric), not acc
    assert score["speedup"] == pytest.approx(1.06, abs=0.006)
    assert score["avg"] == pytest.approx(np.mean([36.0, 61.0, 66.5, 53.0]), abs=0.006)  # paper tasks only
    assert score["avg_tasks"] == 4
    assert score["arc_easy"] == 58.5  # extra task kept as its own column
    diff = kit[(kit["row"] == "diff_dense") & (kit["threshold"] == 0.5)].iloc[0]
    assert diff["arc_c"] == pytest.approx(-1.0) and diff["piqa"] == pytest.approx(-1.0)
    assert (t["row"] != "diff_paper").all()  # SmolLM2 is none of the paper's models


def test_cells_never_run_say_not_run(built):
    out, _ = built
    md = (out / "tables" / "main_table.md").read_text()
    line = next(ln for ln in md.splitlines() if "fixture-block-token" in ln and "| mindskip |" in ln)
    cells = [c.strip() for c in line.strip("|").split("|")]
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    row = dict(zip(header, cells))
    assert row["speedup"] == paper_tables.NOT_RUN  # the run was never profiled
    assert row["boolq"] == paper_tables.NOT_RUN and row["hellaswag"] == "36.0"
    raw = (out / "tables" / "main_table.csv").read_text()
    assert paper_tables.NOT_RUN in raw
    tex = (out / "tables" / "main_table.tex").read_text()
    assert paper_tables.NOT_RUN in tex and r"\toprule" in tex and r"$\Delta$ vs dense" in tex
    lora = read_table(out, "lora_table")
    rt = lora[(lora["source"] == "kit") & (lora["method"] == "mindskip") & (lora["row"] == "score")].iloc[0]
    assert rt[["obqa", "piqa", "boolq", "avg"]].isna().all()  # routers-only point not evaluated in the LoRA run
    lrt = lora[(lora["source"] == "kit") & (lora["method"] == "lora+mindskip") & (lora["row"] == "score")].iloc[0]
    assert lrt["boolq"] == pytest.approx(63.5)


def test_comparison_with_the_paper_for_the_papers_own_model(tmp_path):
    run = tmp_path / "runs" / "llama-attn-seq"
    (run / "eval").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "run_id": "llama-attn-seq", "created": "2025-02-01T00:00:00+00:00",
        "parameters": {"train": {"model": "meta-llama/Meta-Llama-3-8B", "granularity": "attn", "route_level": "seq",
                                 "data": "alpaca"}},
        "steps": {"eval": {}}}))
    rows = ["variant,task,metric,value,stderr,n,num_fewshot,threshold,skip_ratio",
            "dense,arc_challenge,acc_norm,0.585,0.014,1172,25,,",
            "dense,hellaswag,acc_norm,0.820,0.004,10042,10,,",
            "mindskip,arc_challenge,acc_norm,0.570,0.014,1172,25,0.5,0.25",
            "mindskip,hellaswag,acc_norm,0.801,0.004,10042,10,0.5,0.25",
            "dense,macro_avg,paper,0.7025,0.007,11214,,,",  # rt_lib.evaluation.driver's summary row
            "mindskip,macro_avg,paper,0.6855,0.007,11214,,0.5,0.25"]
    (run / "eval" / "results.csv").write_text("\n".join(rows) + "\n")
    written = paper.build_all(tmp_path, tmp_path / "tables", tmp_path / "figures", figures=False)
    assert written["problems"] == [] and written["figures"] == {}
    t = read_table(tmp_path, "main_table")
    vs = t[(t["run_id"] == "llama-attn-seq") & (t["row"] == "diff_paper")].iloc[0]
    assert vs["arc_c"] == pytest.approx(57.0 - 56.6) and vs["hellaswag"] == pytest.approx(80.1 - 80.7)
    assert pd.isna(vs["boolq"])
    assert "macro_avg" not in t.columns
    abl = read_table(tmp_path, "data_ablation")
    vs = abl[(abl["run_id"] == "llama-attn-seq") & (abl["row"] == "diff_paper")].iloc[0]
    assert vs["hellaswag"] == pytest.approx(80.1 - 79.8)  # the paper's alpaca row


def test_sweep_runs_sharing_one_dense_evaluation_show_one_dense_row(tmp_path):
    header = "variant,task,metric,value,stderr,n,num_fewshot,threshold,skip_ratio"
    for i, (gran, acc) in enumerate([("attn", 0.64), ("mlp", 0.55)]):
        run = tmp_path / "runs" / f"sweep-{gran}"
        (run / "eval").mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({
            "run_id": f"sweep-{gran}", "created": f"2026-01-0{i + 1}T00:00:00+00:00",
            "parameters": {"train": {"model": "smollm2-135m-instruct", "granularity": gran, "route_level": "seq"}}}))
        (run / "eval" / "results.csv").write_text("\n".join([
            header, "dense,piqa,acc_norm,0.66,0.03,200,0,,",  # the same dense scores (dense_from)
            f"mindskip,piqa,acc_norm,{acc},0.03,200,0,0.5,0.4"]) + "\n")
    paper.build_all(tmp_path, tmp_path / "tables", tmp_path / "figures", figures=False)
    t = read_table(tmp_path, "main_table")
    kit = t[t["source"] != "paper"]
    assert (kit["method"] == "dense").sum() == 1
    assert kit[kit["method"] == "dense"]["run_id"].tolist() == ["sweep-attn"]
    tuned = kit[(kit["method"] == "mindskip") & (kit["row"] == "score")]
    assert sorted(zip(tuned["granularity"], tuned["piqa"])) == [("attn", pytest.approx(64.0)), ("mlp", pytest.approx(55.0))]
    d = kit[kit["row"] == "diff_dense"].set_index("granularity")["piqa"]
    assert d["mlp"] == pytest.approx(-11.0) and d["attn"] == pytest.approx(-2.0)
    assert "shown once" in (tmp_path / "tables" / "main_table.md").read_text()


def test_threshold_sweep_labels_each_row_with_its_own_threshold(tmp_path):
    run = tmp_path / "runs" / "thr"
    (run / "eval").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": "thr", "parameters": {
        "train": {"model": "smollm2-135m-instruct", "granularity": "attn", "route_level": "seq", "threshold": 0.5}}}))
    (run / "eval" / "results.csv").write_text("\n".join([
        "variant,task,metric,value,stderr,n,num_fewshot,threshold,skip_ratio",
        "dense,piqa,acc_norm,0.66,0.03,200,0,,",
        "mindskip_t0.49,piqa,acc_norm,0.70,0.03,200,0,0.49,0.14",
        "mindskip_t0.494,piqa,acc_norm,0.62,0.03,200,0,0.494,0.27"]) + "\n")
    paper.build_all(tmp_path, tmp_path / "tables", tmp_path / "figures", figures=False)
    t = read_table(tmp_path, "main_table")
    tuned = t[(t["method"] == "mindskip") & (t["row"] == "score") & (t["source"] != "paper")]
    # the configured 0.5 was not evaluated: no row claims it
    assert sorted(zip(tuned["threshold"], tuned["piqa"])) == [(0.49, pytest.approx(70.0)), (0.494, pytest.approx(62.0))]


def test_evaluation_only_run_takes_model_and_config_from_results_json(tmp_path):
    run = tmp_path / "runs" / "eval-only"
    (run / "eval").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": "eval-only", "parameters": {"eval": {"tasks": ["piqa"]}},
                                              "steps": {"eval": {"variants": ["dense", "mindskip"]}}}))
    (run / "eval" / "results.csv").write_text(
        "variant,task,metric,value,stderr,n,num_fewshot,threshold,skip_ratio\n"
        "dense,piqa_offline,acc_norm,0.66,0.03,200,0,,\n"
        "mindskip,piqa_offline,acc_norm,0.65,0.03,200,0,0.5,0.3\n"
        "dense,wikitext,word_perplexity,12.3,,62,0,,\n")  # not a fraction, and not rejected for it
    (run / "eval" / "results.json").write_text(json.dumps({"provenance": {
        "model": "smollm2-135m-instruct",
        "mindskip": {"threshold": 0.5, "config": {"granularity": "mlp", "route_level": "token", "threshold": 0.5}}}}))
    df = tidy.collect_runs(tmp_path)
    assert df.attrs["problems"] == []
    ms = df[df["variant"] == "mindskip"].iloc[0]
    assert (ms["model"], ms["granularity"], ms["route_level"], ms["task"]) == ("SmolLM2-135M-Instruct", "mlp", "token", "piqa")


# ---------------------------------------------------------------------------- malformed runs
def _copy_fixtures(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    shutil.copytree(RUNS, root / "runs", ignore=shutil.ignore_patterns("README.md"))
    return root


@pytest.mark.slow
def test_malformed_run_folders_are_named_and_the_rest_builds(tmp_path, caplog):
    root = _copy_fixtures(tmp_path)
    bad_json = root / "runs" / "bad-json"
    shutil.copytree(RUNS / "fixture-attn-seq", bad_json)
    (bad_json / "run.json").write_text('{"run_id": "bad-json", "parameters": {')
    bad_cols = root / "runs" / "bad-columns"
    shutil.copytree(RUNS / "fixture-attn-seq", bad_cols)
    res = pd.read_csv(bad_cols / "eval" / "results.csv").drop(columns=["value", "stderr"])
    res.to_csv(bad_cols / "eval" / "results.csv", index=False)
    percent = root / "runs" / "percent-values"
    shutil.copytree(RUNS / "fixture-lora", percent)
    res = pd.read_csv(percent / "eval" / "results.csv")
    res["value"] *= 100
    res.to_csv(percent / "eval" / "results.csv", index=False)
    no_profile = root / "runs" / "no-profile"
    shutil.copytree(RUNS / "fixture-lora", no_profile)
    (no_profile / "profile" / "profile.csv").unlink()
    (root / "runs" / "empty-folder").mkdir()

    with caplog.at_level(logging.WARNING, logger="rt_lib.paper.build"):
        written = paper.build_all(root, tmp_path / "tables", tmp_path / "figures")
    problems = written["problems"]
    by_name = {p.split(":")[0]: p for p in problems}
    assert set(by_name) == {"bad-json", "bad-columns", "percent-values", "no-profile", "empty-folder"}
    assert "invalid JSON" in by_name["bad-json"]
    assert "missing columns value, stderr" in by_name["bad-columns"]
    assert "outside [0, 1]" in by_name["percent-values"]
    assert "profile/profile.csv missing" in by_name["no-profile"]
    assert "run.json missing" in by_name["empty-folder"]
    for name in by_name:
        assert any(name in rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING)
    # the good runs still build, the bad ones appear nowhere but in the problems list
    t = read_table(tmp_path, "main_table")
    assert {"fixture-attn-seq", "fixture-block-token"} <= set(t["run_id"].dropna())
    assert not set(by_name) & set(t["run_id"].dropna())
    assert not any(n in p.name for n in by_name for ps in written["figures"].values() for p in ps)
    assert "bad-json" in (tmp_path / "tables" / "main_table.md").read_text()  # named in the notes


def test_cli_builds_and_strict_fails_on_problems(tmp_path, capsys):
    root = _copy_fixtures(tmp_path)
    assert paper_cli.main(["--results", str(root), "--no-figures"]) == 0  # figures: test_build_all_*
    assert (root / "tables" / "main_table.md").is_file()
    assert "table  main_table" in capsys.readouterr().out
    (root / "runs" / "fixture-lora" / "train" / "summary.json").write_text("not json")
    assert paper_cli.main(["--results", str(root), "--strict", "--no-figures"]) == 1
    assert "fixture-lora" in capsys.readouterr().err


def test_figure2_kit_curve_uses_one_run():
    runs, _ = rundir.load_runs(RUNS)
    rows = tidy.tidy_runs(runs, "prefill")
    kit, title = figures.figure2_kit_points(runs, rows)
    assert "fixture-attn-seq" in title  # the attn run with the most operating points
    assert sorted(kit["method"]) == ["dense", "mindskip", "mindskip", "mindskip", "static_drop"]
    dense = kit.loc[kit["method"] == "dense", "performance"].iloc[0]
    assert dense == pytest.approx(np.mean([37.0, 60.5, 61.5, 67.5, 53.0]))  # 5 tasks, percent
    # every kit point but dense carries its paired interval, combined over the same tasks
    assert kit.loc[kit["method"] == "dense", ["ci_low", "ci_high"]].isna().all().all()
    routed = kit[kit["method"] != "dense"]
    assert (routed.ci_low < routed.performance).all() and (routed.performance < routed.ci_high).all()
    pts, common = figures.operating_points(rows, "fixture-attn-seq")
    row = pts[pts.method == "mindskip"].iloc[0]
    sub = rows[(rows.run_id == "fixture-attn-seq") & (rows.variant == row.variant) & (rows.threshold == row.threshold)]
    ses = [(tidy.pick_metric(sub, t)["ci_high"] - tidy.pick_metric(sub, t)["ci_low"]) / 2 / 1.96 for t in common]
    half = 100 * 1.96 * np.sqrt(np.sum(np.square(ses))) / len(ses)
    assert row.ci_high - row.accuracy == pytest.approx(half)


def test_a_figure_failing_on_odd_data_is_reported_and_the_rest_drawn(tmp_path, monkeypatch):
    root = tmp_path / "results"
    shutil.copytree(RUNS / "fixture-block-token", root / "runs" / "fixture-block-token")
    from rt_lib import plots

    def broken(*args, **kwargs):
        raise ValueError("odd data")

    monkeypatch.setattr(plots, "plot_capacity_heatmap", broken)
    written = paper.build_all(root, tmp_path / "tables", tmp_path / "figures")
    assert written["problems"] == ["fixture-block-token: figure capacity_heatmap_fixture-block-token not drawn "
                                   "(ValueError: odd data)"]
    assert {"fig2_drop_vs_mindskip", "accuracy_vs_speedup_fixture-block-token"} <= set(written["figures"])


# ---------------------------------------------------------------------------- stale runs
def test_runs_with_stale_steps_are_left_out_naming_the_refresh_command(tmp_path):
    """A step rerun with --replace leaves later steps stale (rt_lib.runs.record.start_step); a step whose
    recorded input (the routers it used) changed since is stale too. Neither may reach a table."""
    root = _copy_fixtures(tmp_path)
    marked = root / "runs" / "fixture-attn-seq"
    meta = json.loads((marked / "run.json").read_text())
    meta["steps"]["profile"] = {"stale": True, "stale_reason": "train was rerun on 2026-01-01T00:00:00+00:00"}
    (marked / "run.json").write_text(json.dumps(meta))
    changed = root / "runs" / "fixture-block-token"
    (changed / "train" / "routers").mkdir(parents=True)
    (changed / "train" / "routers" / "routers.safetensors").write_bytes(b"new routers")
    meta = json.loads((changed / "run.json").read_text())
    meta["steps"]["eval"]["inputs"] = {"routers": {"path": "train/routers/routers.safetensors", "sha256": "0" * 64}}
    (changed / "run.json").write_text(json.dumps(meta))

    written = paper.build_all(root, tmp_path / "tables", tmp_path / "figures", figures=False)
    by_name = {p.split(":")[0]: p for p in written["problems"]}
    assert set(by_name) == {"fixture-attn-seq", "fixture-block-token"}
    assert "stale results, not used: profile (train was rerun" in by_name["fixture-attn-seq"]
    assert "--run-id fixture-attn-seq --notebooks 03" in by_name["fixture-attn-seq"]
    assert "eval (its routers train/routers/routers.safetensors changed after it ran)" in by_name["fixture-block-token"]
    assert "--notebooks 02" in by_name["fixture-block-token"]
    tidy = pd.read_csv(tmp_path / "tables" / "runs.csv")
    assert set(tidy["run_id"]) == {"fixture-lora"}  # no row of a stale run
    with pytest.raises(rundir.StaleRun):
        rundir.read_run(marked)


def test_notebook_04_shows_the_headline_figures_and_this_runs_and_lists_the_rest():
    from pathlib import Path

    from rt_lib.paper.build import figures_to_show

    names = ["fig2_drop_vs_mindskip", "router_frontier", "evidence_tasks", "capacity_heatmap_run-a",
             "capacity_heatmap_run-b", "training_curves_run-a"]
    built = {"figures": {n: [Path(f"/f/{n}.png"), Path(f"/f/{n}.pdf")] for n in names}}
    shown, listed = figures_to_show(built, "run-a")
    assert [p.stem for p in shown] == ["evidence_tasks", "fig2_drop_vs_mindskip", "router_frontier",
                                       "capacity_heatmap_run-a", "training_curves_run-a"]
    assert [p.name for p in listed] == ["capacity_heatmap_run-b.png"]


def test_output_folders_of_notebook_04():
    """Notebook 04's parameters: empty folders default to the run folder's, only with a run folder."""
    assert paper.output_folders() == (Path("results"), Path("results/tables"), Path("results/figures"))
    run = Path("/r/runs/s")
    assert paper.output_folders(run, "", "", "") == (Path("/r/runs"), run / "paper" / "tables", run / "paper" / "figures")
    assert paper.output_folders(run, "res", "t", "") == (Path("res"), Path("t"), run / "paper" / "figures")
    with pytest.raises(ValueError, match="tables_dir/figures_dir may only be empty together with a run_dir"):
        paper.output_folders("", "results", "", "f")
    with pytest.raises(ValueError, match="results_root may only be empty together with a run_dir"):
        paper.output_folders("", "", "t", "f")

"""Notebooks and the papermill pipeline (issue #7): presets, parameter checks, the smoke run."""

import ast
import json

import nbformat
import pandas as pd
import pytest

from rt_lib import pipeline, reproduce, runs


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged `parameters`"
    return cells[0]


@pytest.mark.parametrize("name", pipeline.NOTEBOOKS)
def test_stored_notebooks_have_no_outputs_and_one_parsed_parameters_cell(name):
    nb = nbformat.read(pipeline.NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert not c.outputs and c.execution_count is None, f"{name} carries outputs: strip them"
    cell = _parameters_cell(nb)
    # every assignment in the parameters cell must be visible to papermill (it silently drops
    # lines it cannot parse, e.g. an '=' inside a comment), and documented by a comment
    assigned = [t.target.id for t in ast.parse(cell.source).body if isinstance(t, ast.AnnAssign)]
    plain = [t for t in ast.parse(cell.source).body if isinstance(t, ast.Assign)]
    assert not plain, f"{name}: annotate every parameter (name: type = value) so its type is checked"
    declared = pipeline.declared_parameters(name)
    assert assigned == list(declared)
    assert all(spec["help"] for spec in declared.values()), f"{name}: comment every parameter"
    assert "run_dir" in declared
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("preset", ["smoke", "cpu", "paper"])
def test_presets_name_only_declared_parameters_of_the_right_type(preset):
    assert preset in pipeline.available_presets()
    sections = pipeline.load_preset(preset)
    assert set(sections) - {"description"} == set(pipeline.NOTEBOOKS)
    pipeline.validate({nb: sec for nb, sec in sections.items() if nb in pipeline.NOTEBOOKS})


def test_unknown_parameter_fails_before_execution_with_the_valid_list(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "-p", "02_evaluation.treshold=0.5"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "unknown parameter 'treshold'" in msg and "thresholds" in msg and "batch_size" in msg
    assert not any(tmp_path.iterdir()), "nothing may run (or be created) before parameters are valid"


@pytest.mark.parametrize("override, expected", [
    ("02_evaluation.batch_size=\"eight\"", "should be int"),
    ("01.max_steps=2.5", "should be Optional[int]"),
    ("03_speedup_profiling.threads=true", "should be Optional[int]"),
    ("nosuch=1", "no notebook declares a parameter 'nosuch'"),
])
def test_wrong_types_and_names_fail_before_execution(tmp_path, capsys, override, expected):
    with pytest.raises(SystemExit):
        reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "-p", override])
    assert expected in capsys.readouterr().err


def test_unknown_preset_lists_the_available_ones(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--preset", "gpu"])
    assert "unknown preset 'gpu'; available presets: ['cpu', 'paper', 'smoke']" in capsys.readouterr().err


def test_sweep_values_are_validated_too(tmp_path, capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--sweep", "max_steps=2,x"])
    assert "max_steps" in capsys.readouterr().err


def test_failing_notebook_is_named_with_its_cell_and_output_kept(tmp_path, capsys):
    rc = reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "f", "--no-progress",
                         "--notebooks", "02", "-p", "02_evaluation.model=\"tiny-random-llama\""])
    assert rc == 1  # fresh default routers (16 layers) do not fit the 4-layer model
    err = capsys.readouterr().err
    assert "notebook 02_evaluation failed at cell" in err and "num_routed_layers=16 is too many" in err
    assert (tmp_path / "f" / "notebooks" / "02_evaluation.ipynb").exists()
    assert (tmp_path / "f" / "run.json").exists()


def test_smoke_pipeline_runs_all_four_notebooks(tmp_path):
    assert reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "s", "--no-progress"]) == 0
    run = tmp_path / "s"
    for nb in pipeline.NOTEBOOKS:
        executed = nbformat.read(run / "notebooks" / f"{nb}.ipynb", as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
    # 01: routers, log, summary, curves
    assert sorted(p.name for p in (run / "train" / "routers").iterdir()) == ["mindskip_config.json",
                                                                          "routers.safetensors"]
    log = pd.read_csv(run / "train" / "log.csv")
    assert len(log) == json.loads((run / "train" / "summary.json").read_text())["steps"] > 0
    assert (run / "train" / "training_curves.png").exists()
    # 02: dense, MindSkip and static drop on the same documents, paired to dense
    res = pd.read_csv(run / "eval" / "results.csv")
    variants = set(res.variant)
    assert {"dense", "mindskip"} <= variants
    paired = pd.read_csv(run / "eval" / "paired.csv")
    assert set(paired.variant) == variants - {"dense"}
    assert set(res.task) >= {"piqa", "rte"}
    # 03: every variant on the grid
    prof = pd.read_csv(run / "profile" / "profile.csv")
    assert {"dense", "mindskip", "oracle", "mask"} <= set(prof.variant)
    assert set(prof.regime) == {"prefill", "decode"}
    # 04: tables and figures inside the run folder (smoke writes nothing into results/)
    for name in ("main_table", "lora_table", "data_ablation"):
        for ext in ("md", "csv", "tex"):
            assert (run / "paper" / "tables" / f"{name}.{ext}").exists()
    assert (run / "paper" / "figures" / "fig2_drop_vs_mindskip.png").exists()
    main = (run / "paper" / "tables" / "main_table.md").read_text()
    assert "| paper | Llama-3-8B | baseline" in main and "s" in main
    record = runs.load_run(run)
    assert set(record["steps"]["pipeline"]["notebooks"]) == set(pipeline.NOTEBOOKS)
    assert {"train", "eval", "profile"} <= set(record["steps"])


def test_sweep_runs_each_combination_in_its_own_folder(tmp_path):
    rc = reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "sw", "--no-progress",
                         "--notebooks", "01", "--sweep", "max_steps=1,2"])
    assert rc == 0
    for steps in (1, 2):
        run = tmp_path / f"sw-max_steps={steps}"
        assert json.loads((run / "train" / "summary.json").read_text())["steps"] == steps
        assert runs.load_run(run)["parameters"]["pipeline"]["sweep"] == {"max_steps": steps}


def test_failed_sweep_point_does_not_stop_the_others(tmp_path, capsys):
    rc = reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "sf", "--no-progress",
                         "--notebooks", "01", "--sweep", "num_routed_layers=16,2"])
    assert rc == 1  # 16 routed layers do not fit the 4-layer smoke model ...
    err = capsys.readouterr().err
    assert "FAILED sf-num_routed_layers=16" in err
    # ... and the next point still ran
    assert (tmp_path / "sf-num_routed_layers=2" / "train" / "routers" / "routers.safetensors").exists()


def test_evaluation_reuses_dense_scores_and_matches_static_drop_per_threshold(tmp_path):
    assert reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "a", "--no-progress",
                           "--notebooks", "01,02"]) == 0
    a = tmp_path / "a"
    # a second run folder, evaluation only: the routers of run a at two thresholds, dense from run a
    assert reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "b", "--no-progress",
                           "--notebooks", "02", "-p", f"02_evaluation.routers={json.dumps(str(a / 'train' / 'routers'))}",
                           "-p", f"02_evaluation.dense_from={json.dumps(str(a))}",
                           "-p", "02_evaluation.thresholds=[0.0, 2.0]"]) == 0
    ra, rb = pd.read_csv(a / "eval" / "results.csv"), pd.read_csv(tmp_path / "b" / "eval" / "results.csv")
    dense_a, dense_b = (r[r.variant == "dense"].reset_index(drop=True) for r in (ra, rb))
    pd.testing.assert_frame_equal(dense_a, dense_b)  # copied, not re-run
    macro = rb[rb.task == "macro_avg"].set_index("variant")
    # threshold 0 keeps everything (skip 0, k = 0: no static drop), 2 skips every routed layer
    assert macro.loc["mindskip_t0", "skip_ratio"] == 0 and macro.loc["mindskip_t2", "skip_ratio"] == 1
    n_routed = len(json.loads((a / "train" / "routers" / "mindskip_config.json").read_text())["routed_layers"])
    assert set(macro.index) == {"dense", "mindskip_t0", "mindskip_t2", f"static_drop_k{n_routed}"}
    assert macro.loc[f"static_drop_k{n_routed}", "skip_ratio"] == 1
    # the smoke model has 4 layers: droppable (not first or last) = routed = {1, 2}, so dropping k = 2
    # attention layers is what threshold 2 does: identical scores
    assert macro.loc[f"static_drop_k{n_routed}", "value"] == pytest.approx(macro.loc["mindskip_t2", "value"])
    drop = json.loads((tmp_path / "b" / "baselines" / "static_drop.json").read_text())
    assert drop["k"] == n_routed
    paired = pd.read_csv(tmp_path / "b" / "eval" / "paired.csv")
    assert set(paired.variant) == {"mindskip_t0", "mindskip_t2", f"static_drop_k{n_routed}"}
    assert (paired[paired.variant == "mindskip_t0"]["diff"] == 0).all()


def test_evaluation_of_mlp_routers_runs_without_the_attention_drop_baseline(tmp_path):
    assert reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "m", "--no-progress",
                           "--notebooks", "01,02", "-p", 'granularity="mlp"']) == 0
    res = pd.read_csv(tmp_path / "m" / "eval" / "results.csv")
    assert set(res.variant) == {"dense", "mindskip"}  # static drop removes attention: not a match for mlp
    assert res[(res.variant == "mindskip") & (res.task == "macro_avg")].skip_ratio.notna().all()

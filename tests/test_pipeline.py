"""Notebooks and the papermill pipeline: presets, parameter checks, sweeps and reruns into a run
folder (with stand-in notebooks), and one end-to-end smoke run of all four notebooks (slow).

What the notebooks compute is tested through the library calls they make (rt_lib.evaluation.sweep,
rt_lib.runs.checkpoints, rt_lib.tuning.train, rt_lib.speed.profiling, rt_lib.paper.build)."""

import ast
import json

import nbformat
import pandas as pd
import pytest

from rt_lib.pipeline import notebooks as pipeline
from rt_lib.cli import reproduce
from rt_lib.runs import record as runs
from rt_lib.runs import steps as run_steps


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


def test_old_parameter_names_still_work_with_a_note(capsys):
    """`eval_preset` and `profile_preset` are now `task_set` and `profile_grid`: `-p` and `--sweep`
    take the old names, with a note."""
    got = pipeline.parse_overrides(["02_evaluation.eval_preset=\"offline\"", "profile_preset=smoke",
                                    "03.profile_grid=quick"])
    assert got == {"02_evaluation": {"task_set": "offline"}, "03_speedup_profiling": {"profile_grid": "quick"}}
    assert capsys.readouterr().err.splitlines() == [
        "note: parameter 02_evaluation.eval_preset is deprecated, use 02_evaluation.task_set",
        "note: parameter 03_speedup_profiling.profile_preset is deprecated, use 03_speedup_profiling.profile_grid"]
    assert pipeline.parse_overrides(["task_set=quick"]) == {"02_evaluation": {"task_set": "quick"}}
    assert capsys.readouterr().err == ""


def test_the_refresh_command_of_a_committed_run_uses_the_parameter_names_of_now():
    """cpu-main recorded `eval_preset`/`profile_preset` (the cpu preset's values): its refresh
    command passes no -p at all, instead of names the notebooks no longer declare."""
    run = pipeline.ROOT / "results" / "runs" / "cpu-main"
    record = runs.load_run(run)
    ran = record["steps"]["pipeline"]["notebooks"]
    assert "eval_preset" in ran["02_evaluation"]["parameters"]
    assert "profile_preset" in ran["03_speedup_profiling"]["parameters"]
    cmd = run_steps.refresh_command(run, ["eval", "profile"], record)
    assert cmd.endswith("--preset cpu --out " + str(run.parent) + " --run-id cpu-main --notebooks 02,03"), cmd
    changed = json.loads(json.dumps(record))
    changed["steps"]["pipeline"]["notebooks"]["02_evaluation"]["parameters"]["eval_preset"] = "offline"
    assert run_steps.refresh_command(run, ["eval"], changed).endswith("-p '02_evaluation.task_set=\"offline\"'")


def test_unknown_preset_lists_the_available_ones(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--preset", "gpu"])
    assert "unknown preset 'gpu'; available presets: ['cpu', 'paper', 'smoke']" in capsys.readouterr().err


def test_sweep_values_are_validated_too(tmp_path, capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--sweep", "max_steps=2,x"])
    assert "max_steps" in capsys.readouterr().err


@pytest.mark.slow
def test_failing_notebook_is_named_with_its_cell_and_output_kept(tmp_path, capsys):
    rc = reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "f", "--no-progress",
                         "--notebooks", "02", "-p", "02_evaluation.model=\"tiny-random-llama\""])
    assert rc == 1  # step 02 without step 01: no routers to evaluate, and fresh ones were not asked for
    err = capsys.readouterr().err
    assert "notebook 02_evaluation failed at cell" in err and "no tuned routers" in err
    assert (tmp_path / "f" / "notebooks" / "02_evaluation.ipynb").exists()
    assert (tmp_path / "f" / "run.json").exists()


@pytest.mark.slow
def test_smoke_pipeline_runs_all_four_notebooks(tmp_path):
    assert reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "s", "--no-progress"]) == 0
    run = tmp_path / "s"
    for nb in pipeline.NOTEBOOKS:
        executed = nbformat.read(run / "notebooks" / f"{nb}.ipynb", as_version=4)
        assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")
        # every notebook shows the figures it makes
        assert any("image/png" in o.get("data", {}) for c in executed.cells if c.cell_type == "code"
                   for o in c.get("outputs", [])), nb
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
    assert "| paper | Llama-3-8B | dense" in main
    # the run's own rows (source "kit <run id>") beside the paper's: dense and the tuned routers at
    # the preset's threshold
    assert "| kit s | tiny-random-llama | dense |" in main
    assert "| kit s | tiny-random-llama | mindskip | attn | seq | 0.5 |" in main
    record = runs.load_run(run)
    assert set(record["steps"]["pipeline"]["notebooks"]) == set(pipeline.NOTEBOOKS)
    assert {"train", "eval", "profile"} <= set(record["steps"])


# ----------------------------------------------------------------------------- reruns into a run folder
class FakeNotebooks:
    """Stands in for papermill.execute_notebook: each notebook writes its step's main files the
    way the real ones do (routers numbered by execution, so replaced ones can be told apart) and
    the parameters of each call are kept; ``fail`` / ``fail_when`` make a notebook fail."""

    def __init__(self, fail=(), fail_when=None):
        self.calls, self.parameters, self.fail, self.trained = [], [], set(fail), 0
        self.fail_when = fail_when or (lambda notebook, parameters: False)

    def __call__(self, input_path, output_path, parameters=None, **kwargs):
        from pathlib import Path

        from papermill.exceptions import PapermillExecutionError

        nb = Path(input_path).stem
        self.calls.append(nb)
        self.parameters.append((nb, dict(parameters)))
        Path(output_path).write_text("{}")
        if nb in self.fail or self.fail_when(nb, parameters):
            raise PapermillExecutionError(0, 3, "evaluate(...)", "KeyboardInterrupt", "interrupted", [])
        run = Path(parameters["run_dir"])
        if nb == "01_router_tuning":
            self.trained += 1
            (run / "train" / "routers").mkdir(parents=True, exist_ok=True)
            (run / "train" / "routers" / "routers.safetensors").write_text(f"routers {self.trained}")
            (run / "train" / "summary.json").write_text("{}")
            runs.update_run(run, "train", {"finished": True})
        elif nb in ("02_evaluation", "03_speedup_profiling"):
            from rt_lib.runs import read as rundir

            routers = parameters.get("routers") or run / "train" / "routers"
            step, name = ("eval", "results.csv") if nb == "02_evaluation" else ("profile", "profile.csv")
            (run / step).mkdir(exist_ok=True)
            (run / step / name).write_text(",".join(rundir.REQUIRED_COLUMNS[f"{step}/{name}"]) + "\n")  # no rows
            # which routers the results were made with
            (run / step / "used.txt").write_text((Path(routers) / "routers.safetensors").read_text())
            if step == "eval":  # the static drop choice beside the scores
                (run / "baselines").mkdir(exist_ok=True)
                (run / "baselines" / "static_drop.json").write_text("{}")
            runs.update_run(run, step, {"files": [f"{step}/{name}"]})


@pytest.fixture
def fake_notebooks(monkeypatch):
    import papermill

    fake = FakeNotebooks()
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    return fake


def test_sweep_runs_each_combination_in_its_own_folder(tmp_path, fake_notebooks):
    rc = reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "sw", "--no-progress",
                         "--notebooks", "01", "--sweep", "max_steps=1,2"])
    assert rc == 0
    assert [(nb, p["max_steps"]) for nb, p in fake_notebooks.parameters] == [("01_router_tuning", 1),
                                                                            ("01_router_tuning", 2)]
    for steps, (_, parameters) in zip((1, 2), fake_notebooks.parameters):
        run = tmp_path / f"sw-max_steps={steps}"
        assert parameters["run_dir"] == str(run.resolve())
        assert (run / "train" / "routers" / "routers.safetensors").exists()
        assert runs.load_run(run)["parameters"]["pipeline"]["sweep"] == {"max_steps": steps}
        assert runs.load_run(run)["steps"]["pipeline"]["notebooks"]["01_router_tuning"]["parameters"]["max_steps"] == steps


def test_failed_sweep_point_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    import papermill

    fake = FakeNotebooks(fail_when=lambda nb, p: p.get("num_routed_layers") == 16)
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    rc = reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", "sf", "--no-progress",
                         "--notebooks", "01", "--sweep", "num_routed_layers=16,2"])
    assert rc == 1  # the first point failed ...
    err = capsys.readouterr().err
    assert "FAILED sf-num_routed_layers=16" in err
    # ... and the next point still ran
    assert [p["num_routed_layers"] for _, p in fake.parameters] == [16, 2]
    assert (tmp_path / "sf-num_routed_layers=2" / "train" / "routers" / "routers.safetensors").exists()


def _reproduce(tmp_path, run_id, *args):
    return reproduce.main(["--preset", "smoke", "--out", str(tmp_path), "--run-id", run_id, "--no-progress", *args])


def test_rerun_into_a_completed_run_is_refused_before_anything_runs(tmp_path, fake_notebooks, capsys):
    assert _reproduce(tmp_path, "r", "--notebooks", "01,02,03") == 0
    run = tmp_path / "r"
    record = runs.load_run(run)
    assert {s: record["steps"][s]["status"] for s in ("train", "eval", "profile")} == dict.fromkeys(
        ("train", "eval", "profile"), "completed")
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        _reproduce(tmp_path, "r", "--notebooks", "01")
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "--replace" in msg and "train (train, notebooks/01_router_tuning.ipynb)" in msg
    assert "eval (eval, baselines, notebooks/02_evaluation.ipynb)" in msg and "profile (profile" in msg
    assert "would become stale" in msg
    assert fake_notebooks.calls == ["01_router_tuning", "02_evaluation", "03_speedup_profiling"]  # nothing ran
    assert runs.load_run(run) == record  # run.json untouched
    assert (run / "eval" / "used.txt").read_text() == "routers 1"
    # the Python entry point refuses the same way
    with pytest.raises(run_steps.ResultsExist, match="--replace"):
        pipeline.run_pipeline("smoke", run, notebooks=["03_speedup_profiling"], progress=False)


def test_replace_moves_results_aside_and_the_paper_refuses_stale_steps(tmp_path, fake_notebooks):
    from rt_lib.paper import tidy
    from rt_lib.runs import read as rundir

    assert _reproduce(tmp_path, "r", "--notebooks", "01,02,03") == 0
    run = tmp_path / "r"
    assert _reproduce(tmp_path, "r", "--notebooks", "01", "--replace") == 0
    replaced = {p.name.split("-")[0]: p for p in (run / "replaced").iterdir()}
    assert set(replaced) == {"train", "eval", "profile"}
    assert (replaced["train"] / "train" / "routers" / "routers.safetensors").read_text() == "routers 1"
    assert (replaced["train"] / "notebooks" / "01_router_tuning.ipynb").exists()
    assert (replaced["eval"] / "eval" / "used.txt").read_text() == "routers 1"
    assert (run / "train" / "routers" / "routers.safetensors").read_text() == "routers 2"
    assert not (run / "eval").exists() and not (run / "profile").exists()  # no mixed folder left behind
    steps = runs.load_run(run)["steps"]
    assert steps["train"]["status"] == "completed"
    assert steps["eval"]["stale"] and steps["profile"]["stale"]
    with pytest.raises(rundir.StaleRun) as err:
        rundir.read_run(run)
    msg = str(err.value)
    assert "stale" in msg and "eval" in msg and "profile" in msg
    assert msg.endswith("--run-id r --notebooks 02,03") and "--preset smoke" in msg  # preset values: no -p
    df = tidy.collect_runs(tmp_path)
    assert df.empty and "r: stale results" in df.attrs["problems"][0]
    # rerunning the stale steps needs no --replace; then the run is whole again
    assert _reproduce(tmp_path, "r", "--notebooks", "02,03") == 0
    assert (run / "eval" / "used.txt").read_text() == "routers 2"
    assert run_steps.stale_steps(run) == {}
    rundir.read_run(run)


def test_interrupted_notebook_resumes_without_replace(tmp_path, monkeypatch, capsys):
    import papermill

    fake = FakeNotebooks(fail={"02_evaluation"})
    monkeypatch.setattr(papermill, "execute_notebook", fake)
    assert _reproduce(tmp_path, "r", "--notebooks", "01,02,03") == 1
    run = tmp_path / "r"
    assert runs.load_run(run)["steps"]["eval"]["status"] == "running"
    # the whole pipeline again would retrain: refused, with the way to continue
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _reproduce(tmp_path, "r")
    assert "--notebooks 02,03,04" in capsys.readouterr().err
    fake.fail.clear()
    assert _reproduce(tmp_path, "r", "--notebooks", "02,03") == 0
    assert fake.calls == ["01_router_tuning", "02_evaluation", "02_evaluation", "03_speedup_profiling"]
    assert not (run / "replaced").exists()
    steps = runs.load_run(run)["steps"]
    assert all(steps[s]["status"] == "completed" for s in ("train", "eval", "profile"))


def test_evaluation_of_another_runs_routers_goes_stale_when_they_are_replaced(tmp_path, fake_notebooks):
    from rt_lib.runs import read as rundir

    assert _reproduce(tmp_path, "a", "--notebooks", "01") == 0
    a = tmp_path / "a"
    assert _reproduce(tmp_path, "b", "--notebooks", "02",
                      "-p", f"02_evaluation.routers={json.dumps(str(a / 'train' / 'routers'))}") == 0
    b = tmp_path / "b"
    assert runs.load_run(b)["steps"]["eval"]["inputs"]["routers"]["path"] == "../a/train/routers/routers.safetensors"
    assert _reproduce(tmp_path, "b", "--notebooks", "01") == 0  # b's own routers: not what b's eval used
    rundir.read_run(b)
    assert _reproduce(tmp_path, "a", "--notebooks", "01", "--replace") == 0
    with pytest.raises(rundir.StaleRun, match="changed after it ran") as err:
        rundir.read_run(b)
    # the refresh command repeats the parameters 02 ran with
    assert f"--run-id b --notebooks 02 -p '02_evaluation.routers=\"{a / 'train' / 'routers'}\"'" in str(err.value)


def test_new_routers_move_the_evaluation_and_its_baselines_aside(tmp_path, fake_notebooks):
    from rt_lib.paper import tidy

    assert _reproduce(tmp_path, "a", "--notebooks", "01,02") == 0
    a = tmp_path / "a"
    # a second run folder, evaluation only: the routers of run a at two thresholds, dense from run a
    assert _reproduce(tmp_path, "b", "--notebooks", "02",
                      "-p", f"02_evaluation.routers={json.dumps(str(a / 'train' / 'routers'))}",
                      "-p", f"02_evaluation.dense_from={json.dumps(str(a))}",
                      "-p", "02_evaluation.thresholds=[0.0, 2.0]") == 0
    nb, used = fake_notebooks.parameters[-1]
    assert nb == "02_evaluation" and used["dense_from"] == str(a) and used["thresholds"] == [0.0, 2.0]
    # run.json records the routers each evaluation used: a's own, and a's for the evaluation-only run b
    assert runs.load_run(a)["steps"]["eval"]["inputs"]["routers"]["path"] == "train/routers/routers.safetensors"
    b_eval = runs.load_run(tmp_path / "b")["steps"]["eval"]
    assert b_eval["inputs"]["routers"]["path"] == "../a/train/routers/routers.safetensors"
    assert b_eval["status"] == "completed"
    # new routers for a: its evaluation and static drop choice move aside, and b's evaluation is stale
    assert _reproduce(tmp_path, "a", "--notebooks", "01", "-p", "01_router_tuning.max_steps=1", "--replace") == 0
    assert sorted(p.name.split("-")[0] for p in (a / "replaced").iterdir()) == ["eval", "train"]
    assert not (a / "eval").exists() and not (a / "baselines").exists()
    problems = tidy.collect_runs(tmp_path).attrs["problems"]
    assert len(problems) == 2 and all("stale results" in p for p in problems)


def test_full_disk_leaves_no_truncated_executed_notebook(tmp_path, monkeypatch, fake_notebooks):
    """A notebook whose output cannot be written (simulated full disk: the writer leaves a
    truncated file, then fails) keeps the executed copy of the run before it, complete."""
    import errno
    import json

    import papermill

    assert _reproduce(tmp_path, "d", "--notebooks", "01") == 0
    out = tmp_path / "d" / "notebooks" / "01_router_tuning.ipynb"

    def full_disk(input_path, output_path, **kwargs):
        from pathlib import Path

        Path(output_path).write_text('{"cells": [{"source": "tru')  # 8 KiB of JSON, cut short
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(papermill, "execute_notebook", full_disk)
    assert _reproduce(tmp_path, "d", "--notebooks", "01", "--replace") == 1
    notebooks = tmp_path / "d" / "notebooks"
    assert not [p.name for p in notebooks.iterdir() if p.name.startswith(".")]  # no partial copy left
    if out.exists():
        json.loads(out.read_text())  # whatever is there is a whole notebook


@pytest.mark.slow
def test_a_notebook_run_by_hand_refuses_a_parameter_it_does_not_declare(tmp_path):
    """papermill itself only warns about an undeclared parameter; the notebook stops at once."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError, match=r"unknown parameter\(s\) \['regim'\]"):
        papermill.execute_notebook(str(pipeline.NOTEBOOK_DIR / "04_paper_tables_and_figures.ipynb"),
                                   str(tmp_path / "out.ipynb"), parameters={"regim": "decode"},
                                   kernel_name="python3", progress_bar=False, cwd=str(pipeline.ROOT))


def test_every_parameter_line_of_every_notebook_is_understood():
    """papermill skips (with a warning only) a parameter line it cannot parse, e.g. one whose comment
    holds '=': such a parameter would be unknown to the pipeline's checks and to the notebook."""
    import re

    for nb in pipeline.NOTEBOOKS:
        cells = nbformat.read(pipeline.NOTEBOOK_DIR / f"{nb}.ipynb", as_version=4).cells
        source = next(c.source for c in cells if "parameters" in c.metadata.get("tags", []))
        names = {m.group(1) for m in re.finditer(r"^([A-Za-z_]\w*)\s*(?::[^=]+)?=", source, re.M)}
        assert names == set(pipeline.declared_parameters(nb)), nb

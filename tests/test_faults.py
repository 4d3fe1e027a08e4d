"""What the kit guarantees under faults and bad input (docs/faults.md): each test here failed on
the kit before the guarantee it names was built."""

import json

import pytest

from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.mindskip.checkpoint import CONFIG_NAME
from rt_lib.mindskip.model import MindSkipModel, get_mindskip_model
from tests.tiny_models import random_routers, tiny_model


# ----------------------------------------------------------------------------- router configs
def _saved_routers(tmp_path):
    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=3))
    random_routers(ms, seed=2)
    ms.save_pretrained(tmp_path / "r")
    ms.unload()
    return model, tmp_path / "r"


@pytest.mark.parametrize("field, value, match", [
    ("threshold", float("nan"), "threshold must be a finite number"),
    ("threshold", -1, "threshold must be a number in"),
    ("threshold", "0.5", "threshold must be a finite number"),
    ("granularity", "mlp", "was changed after saving"),
    ("route_level", "token", "was changed after saving"),
    ("threshold", 0.6, "was changed after saving"),
])
def test_edited_router_config_is_refused(tmp_path, field, value, match):
    """Invalid values are refused by the config's checks; valid but changed settings by the
    digest the checkpoint records over its config (like changed weights)."""
    model, path = _saved_routers(tmp_path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    meta["config"][field] = value
    (path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        MindSkipModel.from_pretrained(model, path)
    assert not any(type(m).__name__.endswith("Gate") for m in model.modules())  # nothing attached


def test_saved_config_is_covered_by_its_digest_and_overrides_stay_explicit(tmp_path):
    model, path = _saved_routers(tmp_path)
    meta = json.loads((path / CONFIG_NAME).read_text())
    assert len(meta["config_sha256"]) == 64
    ms = MindSkipModel.from_pretrained(model, path, threshold=0.6)  # an explicit choice, not an edit
    assert ms.config.threshold == 0.6
    ms.unload()


@pytest.mark.parametrize("bad", [{"num_routed_layers": 2.5}, {"routed_layers": ["3"]}, {"reg_lambda": float("inf")},
                                 {"capacity_target": True}])
def test_config_types_are_checked(bad):
    with pytest.raises(ValueError):
        MindSkipConfig(**bad)


# ----------------------------------------------------------------------------- figure names
def test_figure_names_of_run_ids_never_collide():
    from rt_lib.paper.figures import figure_names

    names = figure_names(["exp 1", "exp:1", "cpu-main", "sweep-cpu-granularity=attn"])
    assert names["exp 1"] != names["exp:1"] and names["exp 1"].startswith("exp_1-")
    assert names["cpu-main"] == "cpu-main"  # names without a collision stay as they were
    assert names["sweep-cpu-granularity=attn"] == "sweep-cpu-granularity_attn"
    assert len(set(names.values())) == 4


# ----------------------------------------------------------------------------- command lines
@pytest.mark.parametrize("argv", [
    ["train", "--lr", "-1", "--recipe", "smoke"],
    ["train", "--resume-from", "/nonexistent/ckpt", "--recipe", "smoke"],
    ["train", "--recipe", "huge"],
    ["train", "--preset", "huge"],  # the deprecated spelling: a note, then the same error
    ["evidence", "--out", "{tmp}/ev", "--routers", "results/runs/cpu-main", "--task-set", "nope"],
    ["evidence", "--out", "{tmp}/ev", "--routers", "/nonexistent/routers"],
    ["evidence", "--out", "{tmp}/ev", "--routers", "results/runs/cpu-main", "--combine-only"],  # nothing to combine
    ["evidence", "--out", "results/runs/evidence-cpu", "--routers", "results/runs/cpu-main", "--combine-only",
     "--targets", "3"],  # parts scored with other settings
    ["evidence", "--out", "{tmp}/ev", "--routers", "results/runs/cpu-main", "--routing-input", "answer"],
    ["frontier", "--out", "{tmp}/fr", "--routers", "a=/nonexistent/routers"],
    ["plan", "--preset", "nope"],
    ["evaluate", "run", "--pretrained", "tiny-random-llama", "--tasks", "nope", "--out", "{tmp}/e"],
    ["evaluate", "run", "--pretrained", "tiny-random-llama", "--tasks", "rte", "--limit", "0", "--out", "{tmp}/e"],
    ["reproduce", "--run-id", "../x", "--preset", "smoke", "--out", "{tmp}"],
    ["reproduce", "--run-id", "a/b", "--preset", "smoke", "--out", "{tmp}"],
])
def test_bad_input_gives_one_line_and_status_2(tmp_path, capsys, argv):
    from rt_lib.cli import main

    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    # one message line (progress bars of a model load before the error may stand above it)
    assert rc == 2 and "Traceback (most recent call last)" not in err
    assert err.splitlines()[-1].startswith("error: ") and sum(line.startswith("error") for line in err.splitlines()) == 1


def test_a_corrupt_run_record_is_named(tmp_path):
    from rt_lib.runs import record as runs

    run = runs.new_run(root=tmp_path, run_id="r", preset="smoke")
    (run / "run.json").write_text('{"run_id": "r", "steps": {')
    with pytest.raises(ValueError, match=r"run\.json is not valid JSON"):
        runs.load_run(run)
    (run / "run.json").write_text("[]")
    with pytest.raises(ValueError, match="not a run record"):
        runs.load_run(run)


@pytest.mark.parametrize("argv", [["train", "--lr", "abc", "--recipe", "smoke"], ["frontier", "--levels"],
                                  ["profile", "--grid", "huge", "--out", "x"]])
def test_a_malformed_option_gives_usage_and_status_2_without_traceback(capsys, argv):
    from rt_lib.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and "Traceback" not in err


def test_debug_keeps_the_traceback():
    from rt_lib.cli import main

    with pytest.raises(ValueError, match="lr must be positive"):
        main(["--debug", "train", "--lr", "-1", "--recipe", "smoke"])


# ----------------------------------------------------------------------------- one process per run folder
def _holder(folder):
    """A separate process that holds ``folder`` until it is killed; returns once it holds it."""
    import subprocess
    import sys
    import time

    code = ("import sys, time; from rt_lib.files import hold_folder; hold_folder(sys.argv[1], 'test holder'); "
            "print('held', flush=True); time.sleep(120)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "RT_KIT_LOCK_HOLDER"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_folder_another_live_process_holds_is_refused_until_it_ends(tmp_path):
    from rt_lib import files
    from rt_lib.runs import record as runs
    from rt_lib.runs.steps import start_step

    run = runs.new_run(root=tmp_path, run_id="r", preset="smoke")
    proc = _holder(run)
    try:
        with pytest.raises(files.FolderBusy, match=rf"in use by process {proc.pid} .*test holder"):
            files.hold_folder(run)
        with pytest.raises(files.FolderBusy):  # a step the other process may be running is not resumed into
            start_step(run, "train")
        assert "train" not in runs.load_run(run)["steps"]
    finally:
        proc.kill()
        proc.wait()
    start_step(run, "train")  # a killed holder leaves no lock
    assert runs.load_run(run)["steps"]["train"]["status"] == "running"
    files.release_folder(run)


def test_training_into_a_folder_held_by_another_process_is_refused(tmp_path):
    from rt_lib import files
    from tests.test_train import run_small

    proc = _holder(tmp_path / "run")
    try:
        with pytest.raises(files.FolderBusy):
            run_small(tmp_path, max_steps=1)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "run" / "train" / "routers").exists()


# ----------------------------------------------------------------------------- retraining a folder
def test_training_over_finished_routers_is_refused_and_replace_moves_them_aside(tmp_path):
    from rt_lib import files
    from rt_lib.mindskip.checkpoint import WEIGHTS_NAME
    from rt_lib.runs.steps import ResultsExist
    from tests.test_train import run_small

    run_small(tmp_path, max_steps=2)
    first = (tmp_path / "run" / "train" / "routers" / WEIGHTS_NAME).read_bytes()
    with pytest.raises(ResultsExist, match="train .*completed"):
        run_small(tmp_path, max_steps=2, lr=5e-2)
    assert (tmp_path / "run" / "train" / "routers" / WEIGHTS_NAME).read_bytes() == first
    run_small(tmp_path, max_steps=2, lr=5e-2, replace=True)
    moved = list((tmp_path / "run" / "replaced").glob("train-*/train/routers/" + WEIGHTS_NAME))
    assert len(moved) == 1 and moved[0].read_bytes() == first
    assert (tmp_path / "run" / "train" / "routers" / WEIGHTS_NAME).read_bytes() != first
    assert json.loads((moved[0].parents[2] / "step.json").read_text())["files"] == ["train"]
    files.release_folder(tmp_path / "run")


def test_an_interrupted_training_is_continued_or_replaced_not_overwritten(tmp_path):
    from rt_lib import files
    from rt_lib.runs.steps import ResultsExist
    from tests.test_train import run_small

    run_small(tmp_path, max_steps=4, save_every=1, stop_after=1)
    with pytest.raises(ResultsExist, match="(?s)interrupted training.*--resume-from latest"):
        run_small(tmp_path, max_steps=4, save_every=1)
    res = run_small(tmp_path, max_steps=4, save_every=1, resume_from="latest")
    assert res.summary["finished"]
    files.release_folder(tmp_path / "run")


def test_an_attempt_stopped_before_its_first_checkpoint_is_moved_aside_and_started_over(tmp_path):
    from rt_lib import files
    from tests.test_train import run_small

    (tmp_path / "run" / "train").mkdir(parents=True)
    (tmp_path / "run" / "train" / "log.csv").write_text("step,loss\n1,9.0\n")
    assert run_small(tmp_path, max_steps=2).summary["finished"]
    kept = list((tmp_path / "run" / "replaced").glob("train-*/train/log.csv"))
    assert len(kept) == 1 and kept[0].read_text().startswith("step,loss\n1,9.0")
    files.release_folder(tmp_path / "run")


def test_retraining_a_pipeline_run_marks_its_evaluation_stale(tmp_path):
    from rt_lib import files
    from rt_lib.runs import record as runs
    from rt_lib.runs.steps import ResultsExist, finish_step, start_step, step_state
    from tests.test_train import run_small

    run = runs.new_run(root=tmp_path, run_id="run", preset="smoke")
    start_step(run, "train")
    run_small(tmp_path, max_steps=2)
    finish_step(run, "train")
    start_step(run, "eval")
    (run / "eval").mkdir()
    (run / "eval" / "results.csv").write_text("task,acc\n")
    finish_step(run, "eval")
    with pytest.raises(ResultsExist, match="completed"):
        run_small(tmp_path, max_steps=2)
    run_small(tmp_path, max_steps=2, replace=True)
    record = runs.load_run(run)
    assert step_state(run, record, "eval")[0] == "stale" and not (run / "eval").exists()
    assert {m["step"] for m in record["replacements"]} == {"train", "eval"}
    files.release_folder(run)


def test_routers_and_cached_models_are_readable_by_other_users(tmp_path):
    import os
    import stat

    from rt_lib import files

    model = tiny_model("llama")
    ms = get_mindskip_model(model, MindSkipConfig(num_routed_layers=2))
    ms.save_pretrained(tmp_path / "r")
    ms.unload()
    umask = os.umask(0)
    os.umask(umask)
    want = 0o666 & ~umask
    for f in (tmp_path / "r").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == want, f
    with files.atomic_dir(tmp_path / "cache") as d:
        os.close(os.open(d / "model.safetensors", os.O_WRONLY | os.O_CREAT, 0o600))
    assert stat.S_IMODE((tmp_path / "cache" / "model.safetensors").stat().st_mode) == want

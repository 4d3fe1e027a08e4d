"""Run folders, run.json provenance, atomic writes."""

import json
import math
import os
import shutil
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import torch

from rt_lib import files
from rt_lib.runs import record as runs
from rt_lib.runs import steps as run_steps

REQUIRED = {"run_id", "created", "preset", "parameters", "versions", "git_revision", "device", "threads", "steps"}


def test_new_run_writes_the_documented_run_json(tmp_path):
    run_dir = runs.new_run(tmp_path / "runs", run_id="r1", preset="cpu", parameters={"seed": 0})
    assert run_dir == tmp_path / "runs" / "r1"
    record = json.loads((run_dir / "run.json").read_text())
    assert REQUIRED <= set(record)  # docs/results_format.md
    assert record["run_id"] == "r1" and record["preset"] == "cpu" and record["parameters"] == {"seed": 0}
    assert set(record["versions"]) == {"python", "torch", "transformers", "lm_eval", "rt_lib"}
    assert record["versions"]["torch"] == torch.__version__
    assert record["device"] == ("cpu" if not torch.cuda.is_available() else record["device"])
    assert record["threads"] == torch.get_num_threads() and record["steps"] == {}
    assert datetime.fromisoformat(record["created"]).tzinfo is not None
    assert os.listdir(run_dir) == ["run.json"]  # no temporary or lock files left behind


def test_git_revision_is_the_checked_out_commit():
    root = Path(runs.__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    info = runs.provenance()
    assert info["git_revision"] == head and isinstance(info["git_dirty"], bool)
    assert runs.git_revision("/") == {"revision": None, "dirty": None}  # outside any repository


def test_default_run_ids_are_unique(tmp_path):
    a = runs.new_run(tmp_path, preset="smoke")
    b = runs.new_run(tmp_path, preset="smoke")
    assert a != b and "smoke" in a.name and "smoke" in b.name  # same second: "<id>-2"


def test_rerun_keeps_created_and_steps(tmp_path):
    run_dir = runs.new_run(tmp_path, run_id="r", preset="cpu", parameters={"a": 1})
    runs.update_run(run_dir, "train", {"steps": 10})
    first = runs.load_run(run_dir)
    runs.new_run(tmp_path, run_id="r", parameters={"b": 2})
    second = runs.load_run(run_dir)
    assert second["created"] == first["created"] and second["preset"] == "cpu"
    assert second["parameters"] == {"a": 1, "b": 2}
    assert second["steps"]["train"]["steps"] == 10
    assert second["history"][0]["git_revision"] == first["git_revision"]


def test_update_run_merges_under_the_step(tmp_path):
    run_dir = runs.new_run(tmp_path, run_id="r")
    runs.update_run(run_dir, "eval", {"tasks": ["piqa"], "n": 1})
    record = runs.update_run(run_dir, "eval", {"n": 2, "dtype": torch.bfloat16, "path": run_dir / "eval"})
    assert record == runs.load_run(run_dir)
    eval_ = record["steps"]["eval"]
    assert eval_["tasks"] == ["piqa"] and eval_["n"] == 2
    assert eval_["dtype"] == "torch.bfloat16" and eval_["path"] == str(run_dir / "eval")
    with pytest.raises(FileNotFoundError, match="new_run"):
        runs.update_run(tmp_path / "missing", "eval", {})
    with pytest.raises(ValueError, match="invalid run id"):
        runs.new_run(tmp_path, run_id="a/b")


def test_concurrent_updates_are_not_lost(tmp_path):
    run_dir = runs.new_run(tmp_path, run_id="r")
    threads = [threading.Thread(target=runs.update_run, args=(run_dir, f"s{i}", {"i": i})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {k: v["i"] for k, v in runs.load_run(run_dir)["steps"].items()} == {f"s{i}": i for i in range(8)}


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "a.txt"
    files.atomic_write_text(path, "old")
    assert path.read_text() == "old" and oct(path.stat().st_mode & 0o777) == "0o644"

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(path.parent) == ["a.txt"]


def test_atomic_write_json_handles_common_types(tmp_path):
    obj = {
        "path": Path("/x"), "dtype": torch.float16, "scalar": torch.tensor(1.5), "vector": torch.tensor([1, 2]),
        "set": {"b", "a"}, "nan": float("nan"),
    }
    files.atomic_write_json(tmp_path / "a.json", obj)
    back = json.loads((tmp_path / "a.json").read_text())
    assert back["path"] == "/x" and back["dtype"] == "torch.float16" and back["scalar"] == 1.5
    assert back["vector"] == [1, 2] and back["set"] == ["a", "b"] and math.isnan(back["nan"])


def test_write_csv_from_rows_and_dataframe(tmp_path):
    rows = [{"task": "piqa", "value": 0.5}, {"task": "rte", "value": 0.25, "stderr": 0.01}]
    files.write_csv(tmp_path / "a.csv", rows)
    assert (tmp_path / "a.csv").read_text() == "task,value,stderr\npiqa,0.5,\nrte,0.25,0.01\n"
    frame = pd.DataFrame(rows)
    files.write_csv(tmp_path / "b.csv", frame)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b.csv"), frame)
    files.write_csv(tmp_path / "c.csv", rows, columns=["value", "task", "stderr"])
    assert (tmp_path / "c.csv").read_text().splitlines()[0] == "value,task,stderr"


# ---------------------------------------------------------------------------- rerun, replace, stale
def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _completed_run(root: Path, run_id: str = "r") -> Path:
    """A run whose train, eval and profile completed as rt_lib.pipeline.notebooks records them (fake files)."""
    run = runs.new_run(root, run_id=run_id, preset="smoke")
    run_steps.start_step(run, "train")
    _write(run / "train" / "routers" / "routers.safetensors", "old routers")
    _write(run / "train" / "summary.json", "{}")
    runs.update_run(run, "train", {"finished": True, "steps": 3})
    run_steps.finish_step(run, "train")
    for step, files in (("eval", ["eval/results.csv", "baselines/static_drop.json"]),
                        ("profile", ["profile/profile.csv"])):
        run_steps.start_step(run, step)
        for f in files:
            _write(run / f, f"old {f}")
        runs.update_run(run, step, {"files": files})
        run_steps.finish_step(run, step)
    return run


def test_completed_steps_are_recorded_with_their_inputs(tmp_path):
    run = _completed_run(tmp_path)
    steps = runs.load_run(run)["steps"]
    states = {s: run_steps.step_state(run, runs.load_run(run), s)[0] for s in run_steps.STEPS}
    assert states == dict.fromkeys(run_steps.STEPS, "completed")
    assert steps["eval"]["status"] == "completed" and steps["eval"]["files"]
    sha = files.file_sha256(run / "train/routers/routers.safetensors")
    assert steps["eval"]["inputs"] == {"routers": {"path": "train/routers/routers.safetensors", "sha256": sha}}
    assert steps["train"]["inputs"] == {}


def test_rerunning_a_completed_step_is_refused_naming_replace(tmp_path):
    run = _completed_run(tmp_path)
    before = (run / "run.json").read_text()
    with pytest.raises(run_steps.ResultsExist) as err:
        run_steps.start_step(run, "train")
    msg = str(err.value)
    assert "--replace" in msg and "replace=True" in msg
    assert "train (train, notebooks/01_router_tuning.ipynb)" not in msg  # only files that exist are named
    assert "train (train)" in msg and "would be rerun" in msg
    assert "eval (eval, baselines)" in msg and "profile (profile)" in msg and "would become stale" in msg
    assert [b[0] for b in err.value.blocking] == ["train", "eval", "profile"]
    # nothing changed
    assert (run / "run.json").read_text() == before and not (run / "replaced").exists()
    assert (run / "train" / "routers" / "routers.safetensors").read_text() == "old routers"
    with pytest.raises(run_steps.ResultsExist, match="eval"):
        run_steps.start_step(run, "eval")  # a leaf step too
    assert run_steps.replace_plan(run, "profile") == [
        ("profile", "completed (notebook 03_speedup_profiling): would be rerun")]


def test_replace_moves_old_results_aside_and_marks_later_steps_stale(tmp_path):
    run = _completed_run(tmp_path)
    old = runs.load_run(run)["steps"]
    run_steps.start_step(run, "train", replace=True)
    record = runs.load_run(run)
    moved = {m["step"]: run / m["moved_to"] for m in record["replacements"]}
    assert set(moved) == {"train", "eval", "profile"}
    assert all(p.parent == run / "replaced" and p.name.startswith(f"{s}-") for s, p in moved.items())
    # nothing lost: the old files and the old run.json entries are under replaced/
    assert (moved["train"] / "train" / "routers" / "routers.safetensors").read_text() == "old routers"
    assert (moved["eval"] / "eval" / "results.csv").read_text() == "old eval/results.csv"
    assert (moved["eval"] / "baselines" / "static_drop.json").exists()
    assert (moved["profile"] / "profile" / "profile.csv").exists()
    assert json.loads((moved["eval"] / "step.json").read_text())["record"] == old["eval"]
    assert not any((run / d).exists() for d in ("train", "eval", "baselines", "profile"))
    # the rerun step is running, the later ones stale with a reason
    assert record["steps"]["train"]["status"] == "running"
    for step in ("eval", "profile"):
        entry = record["steps"][step]
        assert entry["stale"] is True and "train was rerun" in entry["stale_reason"]
        assert entry["moved_to"] == moved[step].relative_to(run).as_posix()
    assert set(run_steps.stale_steps(run)) == {"eval", "profile"}
    # new routers; a stale step reruns without replace and is fresh again
    _write(run / "train" / "routers" / "routers.safetensors", "new routers")
    run_steps.finish_step(run, "train")
    run_steps.start_step(run, "eval")
    run_steps.finish_step(run, "eval")
    record = runs.load_run(run)
    assert "stale" not in record["steps"]["eval"] and run_steps.step_state(run, record, "eval")[0] == "completed"
    new_sha = files.file_sha256(run / "train/routers/routers.safetensors")
    assert record["steps"]["eval"]["inputs"]["routers"]["sha256"] == new_sha
    assert set(run_steps.stale_steps(run)) == {"profile"}


def test_interrupted_step_resumes_without_replace(tmp_path):
    run = runs.new_run(tmp_path, run_id="r", preset="smoke")
    run_steps.start_step(run, "train")
    ckpt = _write(run / "train" / "checkpoints" / "step-000002" / "trainer_state.json", "state")
    # ... killed here: no finish_step. The rerun resumes, keeping the checkpoint.
    assert run_steps.step_state(run, runs.load_run(run), "train")[0] == "interrupted"
    assert run_steps.replace_plan(run, "train") == []
    run_steps.start_step(run, "train")
    assert ckpt.read_text() == "state" and not (run / "replaced").exists()
    # a training stopped early (stop_after: finished false) is resumable too
    runs.update_run(run, "train", {"finished": False})
    run_steps.finish_step(run, "train")
    run_steps.start_step(run, "train")
    assert ckpt.exists() and runs.load_run(run)["steps"]["train"]["status"] == "running"
    _write(run / "train" / "routers" / "routers.safetensors", "routers")
    runs.update_run(run, "train", {"finished": True})
    run_steps.finish_step(run, "train")
    # an interrupted evaluation after a completed training: resumes, nothing replaced
    run_steps.start_step(run, "eval")
    run_steps.start_step(run, "eval")
    assert not (run / "replaced").exists() and run_steps.step_state(run, runs.load_run(run), "train")[0] == "completed"


def test_changed_inputs_make_a_step_stale_also_across_runs(tmp_path):
    a = _completed_run(tmp_path, "a")
    # evaluation-only run b of a's routers (notebook 02 with routers=...)
    b = runs.new_run(tmp_path, run_id="b")
    run_steps.start_step(b, "eval", inputs={"routers": a / "train" / "routers" / "routers.safetensors"})
    _write(b / "eval" / "results.csv", "b")
    run_steps.finish_step(b, "eval")
    assert runs.load_run(b)["steps"]["eval"]["inputs"]["routers"]["path"] == "../a/train/routers/routers.safetensors"
    # tuning routers in b itself does not touch b's evaluation of a's routers
    assert run_steps.replace_plan(b, "train") == []
    # a's routers overwritten behind the kit's back (e.g. rt_lib.tuning.train --out a): a's and b's evaluations are stale
    _write(a / "train" / "routers" / "routers.safetensors", "other routers")
    assert run_steps.stale_steps(a) == {"eval": "its routers train/routers/routers.safetensors changed after it ran",
                                   "profile": "its routers train/routers/routers.safetensors changed after it ran"}
    assert "changed after it ran" in run_steps.stale_steps(b)["eval"]
    (a / "train" / "routers" / "routers.safetensors").unlink()
    assert "no longer exist" in run_steps.stale_steps(b)["eval"]

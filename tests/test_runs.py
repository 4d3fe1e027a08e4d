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

from rt_lib import runs

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
    runs.atomic_write_text(path, "old")
    assert path.read_text() == "old" and oct(path.stat().st_mode & 0o777) == "0o644"

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(runs.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        runs.atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(path.parent) == ["a.txt"]


def test_atomic_write_json_handles_common_types(tmp_path):
    obj = {
        "path": Path("/x"), "dtype": torch.float16, "scalar": torch.tensor(1.5), "vector": torch.tensor([1, 2]),
        "set": {"b", "a"}, "nan": float("nan"),
    }
    runs.atomic_write_json(tmp_path / "a.json", obj)
    back = json.loads((tmp_path / "a.json").read_text())
    assert back["path"] == "/x" and back["dtype"] == "torch.float16" and back["scalar"] == 1.5
    assert back["vector"] == [1, 2] and back["set"] == ["a", "b"] and math.isnan(back["nan"])


def test_write_csv_from_rows_and_dataframe(tmp_path):
    rows = [{"task": "piqa", "value": 0.5}, {"task": "rte", "value": 0.25, "stderr": 0.01}]
    runs.write_csv(tmp_path / "a.csv", rows)
    assert (tmp_path / "a.csv").read_text() == "task,value,stderr\npiqa,0.5,\nrte,0.25,0.01\n"
    frame = pd.DataFrame(rows)
    runs.write_csv(tmp_path / "b.csv", frame)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b.csv"), frame)
    runs.write_csv(tmp_path / "c.csv", rows, columns=["value", "task", "stderr"])
    assert (tmp_path / "c.csv").read_text().splitlines()[0] == "value,task,stderr"

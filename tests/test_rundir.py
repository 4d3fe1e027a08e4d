"""rt_lib.rundir: the order in which a run's configuration is looked up, and reading by path or Run."""

import json
from pathlib import Path

import pytest

from rt_lib import rundir

RUNS = Path(__file__).parent / "fixtures" / "runs"


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _run_with_every_source(folder: Path) -> None:
    """A run folder where ``granularity`` has a different value in each source of SETTING_SOURCES."""
    _write(folder / "run.json", {
        "run_id": folder.name,
        "parameters": {"granularity": "parameters", "train": {"granularity": "parameters.train"}},
        "steps": {"train": {"config": {"granularity": "steps.train.config"}},
                  "eval": {"granularity": "steps.eval"}},
    })
    _write(folder / "train" / "summary.json", {"config": {"granularity": "summary.config"},
                                               "train_config": {"granularity": "summary.train_config"}})
    _write(folder / "eval" / "results.json", {"provenance": {"granularity": "provenance",
                                                             "mindskip": {"config": {"granularity": "provenance.config"}}}})


def _drop(folder: Path, file: str, *keys: str) -> None:
    path = folder / file
    obj = json.loads(path.read_text())
    inner = obj
    for k in keys[:-1]:
        inner = inner[k]
    del inner[keys[-1]]
    path.write_text(json.dumps(obj))


def test_setting_follows_the_documented_order_of_sources(tmp_path):
    run = tmp_path / "run"
    _run_with_every_source(run)
    order = [
        ("steps.train.config", ("run.json", "steps", "train", "config")),
        ("summary.config", ("train/summary.json", "config")),
        ("provenance.config", ("eval/results.json", "provenance", "mindskip")),  # no model recorded: read
        ("summary.train_config", ("train/summary.json", "train_config")),
        ("parameters", ("run.json", "parameters", "granularity")),
        ("parameters.train", ("run.json", "parameters", "train")),
        ("steps.eval", ("run.json", "steps", "eval")),
        ("provenance", ("eval/results.json", "provenance", "granularity")),
    ]
    for expected, (file, *keys) in order:
        assert rundir.setting(run, "granularity") == expected
        _drop(run, file, *keys)
    assert rundir.setting(run, "granularity") is None
    assert rundir.setting(run, "granularity", default="attn") == "attn"
    assert len(rundir.SETTING_SOURCES) == 6


def test_eval_provenance_is_read_only_when_run_json_lacks_the_model_or_config(tmp_path):
    run = tmp_path / "run"
    _run_with_every_source(run)
    _write(run / "run.json", {"parameters": {"model": "org/Some-1B"},
                              "steps": {"train": {"config": {"threshold": 0.5}}}})
    assert rundir.setting(run, "granularity") == "summary.train_config"
    _drop(run, "train/summary.json", "train_config")
    assert rundir.setting(run, "granularity") is None  # provenance not consulted: model and config recorded
    _write(run / "run.json", {"steps": {"train": {"config": {"threshold": 0.5}}}})  # no model
    assert rundir.setting(run, "model") is None
    assert rundir.setting(run, "granularity") == "provenance"


def test_earlier_keys_win_within_one_source_and_empty_values_are_skipped(tmp_path):
    run = tmp_path / "run"
    _write(run / "run.json", {"parameters": {"model_id": "b", "model": "", "train": {"model": "c"}}})
    assert rundir.setting(run, "model", "model_id") == "b"  # "" counts as missing
    assert rundir.setting(run, "model_id", "model") == "b"


@pytest.mark.parametrize("run_id", ["fixture-attn-seq", "fixture-block-token", "fixture-lora"])
def test_setting_by_path_agrees_with_the_read_run(run_id):
    run = rundir.read_run(RUNS / run_id)
    for keys in [("granularity",), ("route_level",), ("threshold",), ("trainable",), ("capacity_target",),
                 rundir.MODEL_KEYS, rundir.DATA_KEYS, ("lr",), ("reg_lambda",)]:
        assert rundir.setting(RUNS / run_id, *keys) == rundir.setting(run, *keys) == run.lookup(*keys), keys


def test_run_properties_come_from_setting():
    run = rundir.read_run(RUNS / "fixture-lora")
    assert run.model == rundir.model_name(rundir.setting(run, *rundir.MODEL_KEYS))
    assert run.trainable == "lora"
    assert run.config == rundir.mindskip_config(run.meta, run.files)


def test_runs_dir_accepts_a_results_folder_or_the_runs_folder():
    assert rundir.runs_dir(RUNS.parent) == RUNS
    assert rundir.runs_dir(RUNS) == RUNS

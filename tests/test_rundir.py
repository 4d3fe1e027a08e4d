"""rt_lib.runs.read: the order in which a run's configuration is looked up, and reading by path or Run."""

import json
from pathlib import Path

import pytest

from rt_lib.runs import read as rundir
from rt_lib.runs import schema

RUNS = Path(__file__).parent / "fixtures" / "runs"


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def _old_layout_run(folder: Path) -> None:
    """A run folder as older kit versions wrote it: ``granularity`` in every place they kept it."""
    _write(folder / "run.json", {
        "run_id": folder.name,
        "parameters": {"granularity": "parameters", "train": {"granularity": "parameters.train"}},
        "steps": {"train": {}, "eval": {"preset": "quick", "model": "org/Other", "granularity": "steps.eval"},
                  "profile": {"preset": "quick", "settings": {"granularity": "steps.profile.settings"}}},
    })
    _write(folder / "train" / "summary.json", {"config": {"granularity": "summary.config"},
                                               "train_config": {"granularity": "summary.train_config",
                                                                "lr": 0.001}})
    _write(folder / "eval" / "results.json", {"provenance": {"model": "org/Some-1B",
                                                             "mindskip": {"config": {"granularity": "provenance"}}}})


def _drop(folder: Path, file: str, *keys: str) -> None:
    path = folder / file
    obj = json.loads(path.read_text())
    inner = obj
    for k in keys[:-1]:
        inner = inner[k]
    del inner[keys[-1]]
    path.write_text(json.dumps(obj))


def test_setting_reads_the_mindskip_config_then_each_steps_parameters_in_order(tmp_path):
    run = tmp_path / "run"
    _write(run / "run.json", {
        "parameters": {"pipeline": {"granularity": "parameters.pipeline", "x": 1},
                       "profile": {"granularity": "parameters.profile"},
                       "eval": {"granularity": "parameters.eval", "mindskip": {"granularity": "eval.mindskip"}},
                       "train": {"granularity": "parameters.train"}},
        "steps": {"train": {"config": {"granularity": "steps.train.config"}}},
    })
    order = [
        ("steps.train.config", ("steps", "train", "config")),
        ("eval.mindskip", ("parameters", "eval", "mindskip")),
        ("parameters.train", ("parameters", "train")),  # train before eval though written later
        ("parameters.eval", ("parameters", "eval")),
        ("parameters.profile", ("parameters", "profile")),
        ("parameters.pipeline", ("parameters", "pipeline", "granularity")),
    ]
    for expected, keys in order:
        assert rundir.setting(run, "granularity") == expected
        _drop(run, "run.json", *keys)
    assert rundir.setting(run, "granularity") is None
    assert rundir.setting(run, "granularity", default="attn") == "attn"
    assert rundir.setting(run, "x") == 1
    assert len(schema.SETTING_SOURCES) == 2


def test_upgrade_moves_older_records_to_the_current_places_without_overriding(tmp_path):
    run = tmp_path / "run"
    _old_layout_run(run)
    meta = json.loads((run / "run.json").read_text())
    files = {"train/summary.json": json.loads((run / "train" / "summary.json").read_text())}
    new = rundir.upgrade(meta, files, lambda: json.loads((run / "eval" / "results.json").read_text()))
    assert new["steps"]["train"]["config"] == {"granularity": "summary.config"}
    assert new["parameters"]["train"] == {"granularity": "parameters.train", "lr": 0.001}  # recorded wins
    assert new["parameters"]["pipeline"] == {"granularity": "parameters"}  # old top-level option
    # provenance not read; the task set and the grid were recorded as `preset`
    assert new["parameters"]["eval"] == {"task_set": "quick", "model": "org/Other"}
    assert new["parameters"]["profile"] == {"grid": "quick", "granularity": "steps.profile.settings"}
    assert meta["parameters"] == {"granularity": "parameters", "train": {"granularity": "parameters.train"}}
    assert rundir.setting(run, "granularity") == "summary.config"
    assert rundir.setting(run, "lr") == 0.001


def test_eval_provenance_is_read_only_when_nothing_else_names_the_model_or_routers(tmp_path):
    run = tmp_path / "run"
    _old_layout_run(run)
    calls = []

    def read_eval():
        calls.append(1)
        return json.loads((run / "eval" / "results.json").read_text())

    meta = {"steps": {"eval": {"preset": "quick"}}, "parameters": {"train": {"model": "org/Some-1B"}}}
    assert rundir.upgrade(meta, {"train/summary.json": {"config": {"threshold": 0.5}}}, read_eval)
    assert calls == []  # model and config recorded
    new = rundir.upgrade({"steps": {"eval": {"preset": "quick"}}}, {}, read_eval)  # an evaluation-only run
    assert calls == [1]
    assert new["parameters"]["eval"] == {"task_set": "quick", "model": "org/Some-1B",
                                         "mindskip": {"granularity": "provenance"}}
    _write(run / "run.json", {"steps": {"eval": {"preset": "quick"}}})
    _drop(run, "train/summary.json", "config")
    _drop(run, "train/summary.json", "train_config")
    assert rundir.setting(run, "granularity") == "provenance"
    assert rundir.setting(run, *rundir.MODEL_KEYS) == "org/Some-1B"


def test_options_recorded_as_preset_are_read_under_their_names_now():
    """Runs made before the recipe, task set and grid got their names recorded each as `preset`."""
    meta = {"parameters": {"train": {"preset": "cpu", "lr": 0.001}, "eval": {"preset": "quick"},
                           "profile": {"preset": "full", "model": "m"}, "pipeline": {"preset": "cpu"}}}
    new = rundir.upgrade(meta, {"train/summary.json": {"train_config": {"preset": "cpu", "lr": 0.001}}})
    assert new["parameters"]["train"] == {"recipe": "cpu", "lr": 0.001}
    assert new["parameters"]["eval"] == {"task_set": "quick"}
    assert new["parameters"]["profile"] == {"grid": "full", "model": "m"}
    assert new["parameters"]["pipeline"] == {"preset": "cpu"}  # the pipeline preset keeps its name
    now = {"parameters": {"train": {"recipe": "smoke"}, "eval": {"task_set": "paper"}, "profile": {"grid": "quick"}}}
    assert rundir.upgrade(now, {})["parameters"] == now["parameters"]


def test_earlier_keys_win_within_one_source_and_empty_values_are_skipped(tmp_path):
    run = tmp_path / "run"
    _write(run / "run.json", {"parameters": {"train": {"model_id": "b", "model": ""}, "eval": {"model": "c"}}})
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
    assert run.config == rundir.mindskip_config(run.meta) == run.meta["steps"]["train"]["config"]


def test_runs_dir_accepts_a_results_folder_or_the_runs_folder():
    assert rundir.runs_dir(RUNS.parent) == RUNS
    assert rundir.runs_dir(RUNS) == RUNS

"""What the kit guarantees under faults and bad input (docs/faults.md): each test here failed on
the kit before the guarantee it names was built."""

import json

import pytest

from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.mindskip.model import CONFIG_NAME, MindSkipModel, get_mindskip_model
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
    ["train", "--lr", "-1", "--preset", "smoke"],
    ["train", "--resume-from", "/nonexistent/ckpt", "--preset", "smoke"],
    ["evidence", "--out", "{tmp}/ev", "--routers", "/nonexistent/routers"],
    ["frontier", "--out", "{tmp}/fr", "--routers", "a=/nonexistent/routers"],
    ["plan", "--preset", "nope"],
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


def test_debug_keeps_the_traceback():
    from rt_lib.cli import main

    with pytest.raises(ValueError, match="lr must be positive"):
        main(["--debug", "train", "--lr", "-1", "--preset", "smoke"])

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

"""Trainer state of a checkpoint: safetensors + JSON round trip, nothing executed on load,
corrupt, foreign and legacy (pickle) states refused with a message."""

import json
import pickle
import random

import numpy as np
import pytest
import torch

from rt_lib.tuning.trainer_state import JSON_NAME, LEGACY_NAME, TENSORS_NAME, StateFormatError, read_state, write_state


def _state():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3)
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    opt.step()
    return {"step": 3, "config": {"lr": 1e-3, "tags": ["a"]}, "trainable": {"r.weight": torch.randn(1, 4)},
            "optimizer": opt.state_dict(), "scheduler": {"last_epoch": 3, "_last_lr": [1e-3]},
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "log": [{"step": 1, "loss": 2.5}], "elapsed_s": 1.5, "dense": None}


def test_round_trip_keeps_types_and_values(tmp_path):
    state = _state()
    write_state(tmp_path, state)
    back = read_state(tmp_path)
    assert back["optimizer"]["state"].keys() == state["optimizer"]["state"].keys() == {0}  # int keys survive
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples stay tuples
    assert back["rng"]["python"] == state["rng"]["python"]
    np_state = back["rng"]["numpy"]
    assert np_state[0] == "MT19937" and np.array_equal(np_state[1], state["rng"]["numpy"][1])
    assert np_state[1].dtype == state["rng"]["numpy"][1].dtype
    random.setstate(back["rng"]["python"])
    np.random.set_state(np_state)
    torch.set_rng_state(back["rng"]["torch"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))], lr=1e-3)
    opt.load_state_dict(back["optimizer"])  # the optimiser accepts what came back
    assert back["log"] == state["log"] and back["dense"] is None and back["step"] == 3


class _Payload:
    """What an attacker puts in a pickle: unpickling calls touch(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_crafted_legacy_pickle_is_refused_and_never_opened(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "step-000002"
    ckpt.mkdir()
    (ckpt / LEGACY_NAME).write_bytes(pickle.dumps({"step": 2, "x": _Payload(marker)}))
    with pytest.raises(StateFormatError, match="pickle"):
        read_state(ckpt)
    assert not marker.exists()


def test_resume_from_crafted_checkpoint_runs_nothing(tmp_path):
    """End to end through the tuner: --resume-from a folder holding a crafted pickle."""
    from tests.test_train import run_small

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / LEGACY_NAME).write_bytes(pickle.dumps({"config": _Payload(marker)}))
    with pytest.raises(StateFormatError, match="not opened"):
        run_small(tmp_path, "r", resume_from=str(ckpt))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["json", "tensors", "missing_key", "unknown_tensor", "object_dtype", "wrong_type"])
def test_damaged_states_are_refused(tmp_path, damage):
    write_state(tmp_path, _state())
    meta = json.loads((tmp_path / JSON_NAME).read_text())
    if damage == "json":
        (tmp_path / JSON_NAME).write_text("{not json")
    elif damage == "tensors":
        (tmp_path / TENSORS_NAME).write_bytes(b"\x00" * 20)
    elif damage == "missing_key":
        del meta["optimizer"]
    elif damage == "unknown_tensor":
        meta["trainable"]["r.weight"] = {"__tensor__": "nope"}
    elif damage == "object_dtype":
        meta["rng"]["numpy"]["__tuple__"][1]["dtype"] = "|O"
    elif damage == "wrong_type":
        meta["step"] = "3"
    if damage not in ("json", "tensors"):
        (tmp_path / JSON_NAME).write_text(json.dumps(meta))
    with pytest.raises(StateFormatError):
        read_state(tmp_path)


def test_objects_that_are_not_data_are_not_written(tmp_path):
    with pytest.raises(TypeError, match="cannot store"):
        write_state(tmp_path, {"f": lambda: 0})

"""The trainer state of a tuning checkpoint, stored so that loading it never runs code.

A checkpoint folder ``train/checkpoints/step-<N>/`` keeps the state a resumed run needs
(trainable weights, optimiser, schedule, RNG states, log, data position) in two files:

* ``trainer_state.safetensors``: every tensor (and every numpy array, as its raw bytes);
* ``trainer_state.json``: everything else, with each tensor replaced by ``{"__tensor__": key}``.

Both formats are data only: reading them builds dicts, lists, numbers, strings and tensors and
nothing else, unlike a pickle (``torch.save``), whose loader can be made to call any function by
whoever wrote the file. Tuples (Python's RNG state) and dicts with non-string keys (an
optimiser's per-parameter state) are written as tagged JSON objects so they come back as they
were. ``read_state`` checks the layout before anything is used; older checkpoints written as
``trainer_state.pt`` (a pickle) are refused with a message, never opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

TENSORS_NAME = "trainer_state.safetensors"
JSON_NAME = "trainer_state.json"
LEGACY_NAME = "trainer_state.pt"  # pickle: refused

_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")
_NUMPY_KINDS = "biuf"  # numpy arrays allowed in a state: bool, integer, unsigned, float


class StateFormatError(ValueError):
    """A trainer state that is not what this kit writes (corrupt, foreign or legacy)."""


def encode(obj, tensors: dict[str, torch.Tensor]):
    """``obj`` as JSON values; tensors and numpy arrays go to ``tensors`` under new keys."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NUMPY_KINDS:
            raise TypeError(f"cannot store a numpy array of dtype {obj.dtype}")
        key = f"t{len(tensors)}"
        tensors[key] = torch.frombuffer(bytearray(np.ascontiguousarray(obj).tobytes()), dtype=torch.uint8)
        return {"__ndarray__": key, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[encode(k, tensors), encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a trainer state")


def decode(obj, tensors: dict[str, torch.Tensor]):
    """The inverse of ``encode``; raises ``StateFormatError`` for anything it did not write."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise StateFormatError(f"unexpected JSON value {obj!r}")
    tags = [t for t in _TAGS if t in obj]
    if not tags:
        return {k: decode(v, tensors) for k, v in obj.items()}
    tag = tags[0]
    if tag == "__tuple__":
        return tuple(decode(v, tensors) for v in _list(obj[tag]))
    if tag == "__items__":
        items = _list(obj[tag])
        if not all(isinstance(kv, list) and len(kv) == 2 for kv in items):
            raise StateFormatError("__items__ must hold [key, value] pairs")
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in items}
    key = obj[tag]
    if not isinstance(key, str) or key not in tensors:
        raise StateFormatError(f"tensor {key!r} named in the JSON is not in the safetensors file")
    if tag == "__tensor__":
        return tensors[key]
    dtype = np.dtype(str(obj.get("dtype")))
    if dtype.kind not in _NUMPY_KINDS:
        raise StateFormatError(f"numpy dtype {dtype} is not allowed in a trainer state")
    shape = tuple(int(s) for s in _list(obj.get("shape")))
    arr = np.frombuffer(tensors[key].numpy().tobytes(), dtype=dtype)
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise StateFormatError(f"numpy array {key!r}: {arr.size} values do not fill shape {shape}")
    return arr.reshape(shape).copy()


def _list(v) -> list:
    if not isinstance(v, list):
        raise StateFormatError(f"expected a list, got {type(v).__name__}")
    return v


def _hashable(k):
    if isinstance(k, (int, float, str, bool, tuple)) or k is None:
        return k
    raise StateFormatError(f"dict key {k!r} is not a number, string or tuple")


def write_state(folder: str | os.PathLike, state: dict) -> None:
    """Write ``state`` into ``folder`` (which the caller makes atomic, e.g. ``atomic_dir``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    meta = encode(state, tensors)
    save_file(tensors, str(folder / TENSORS_NAME))
    (folder / JSON_NAME).write_text(json.dumps(meta))


# What a tuning checkpoint's state holds, and the type of each entry.
REQUIRED = {"step": int, "config": dict, "trainable": dict, "optimizer": dict, "scheduler": dict,
            "rng": dict, "log": list, "elapsed_s": (int, float), "dense": (int, float, type(None))}


def read_state(folder: str | os.PathLike) -> dict:
    """The trainer state of checkpoint ``folder``, checked for the layout ``write_state`` gives
    a tuning run (``REQUIRED``); raises ``StateFormatError`` with what to do otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    tpath, jpath = folder / TENSORS_NAME, folder / JSON_NAME
    if not (tpath.is_file() and jpath.is_file()):
        if (folder / LEGACY_NAME).is_file():
            raise StateFormatError(
                f"{folder} holds {LEGACY_NAME}, a pickle written by an older rt-kit; it is not opened because "
                "loading a pickle can run code from the file. Start the tuning again without --resume-from "
                "(the routers saved beside it in routers/ still load).")
        raise StateFormatError(f"{folder} is not a tuning checkpoint: {TENSORS_NAME} and {JSON_NAME} are missing")
    try:
        meta = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StateFormatError(f"{jpath} is not valid JSON ({e}); the checkpoint is corrupt") from None
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise StateFormatError(f"{tpath} is not a readable safetensors file ({e}); the checkpoint is corrupt") from None
    state = decode(meta, tensors)
    if not isinstance(state, dict):
        raise StateFormatError(f"{jpath} does not hold a trainer state")
    for key, kind in REQUIRED.items():
        if key not in state:
            raise StateFormatError(f"{jpath} has no {key!r}; not a checkpoint of this kit")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise StateFormatError(f"{jpath}: {key!r} has type {type(state[key]).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in state["trainable"].values()):
        raise StateFormatError(f"{jpath}: 'trainable' must map parameter names to tensors")
    return state

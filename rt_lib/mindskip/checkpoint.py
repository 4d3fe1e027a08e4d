"""Router checkpoint files: a folder with ``routers.safetensors`` (the router weights) and
``mindskip_config.json`` (format, MindSkip config, routed layers, the base model's name and shapes,
and the sha256 digests that tie the two files together). Reading checks the format and the
digests; nothing is unpickled. ``MindSkipModel.save_pretrained`` / ``from_pretrained``
(``rt_lib.mindskip.model``) write and attach them. May import ``rt_lib.files`` only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rt_lib.files import file_sha256

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "rt-kit-mindskip-routers"
CHECKPOINT_VERSION = 1
WEIGHTS_NAME = "routers.safetensors"
CONFIG_NAME = "mindskip_config.json"


def read_checkpoint_metadata(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir() or not cfg_file.is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{path} is not a router checkpoint folder: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(written by MindSkipModel.save_pretrained)"
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); the router checkpoint is corrupt") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an rt-kit router checkpoint ({CONFIG_NAME} has no format {CHECKPOINT_FORMAT!r})")
    if meta.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path} was written by a newer rt-kit (format {meta['format_version']}); upgrade rt-kit")
    for key in ("config", "num_layers", "hidden_size"):
        if key not in meta:
            raise ValueError(f"{cfg_file} lacks {key!r}; the router checkpoint is corrupt")
    return meta


# What decides what a router checkpoint computes, covered by its config_sha256 (with the weights'
# digest, so that the pair cannot be swapped either).
DIGESTED = ("config", "routed_layers", "base_model", "model_type", "num_layers", "hidden_size", "weights_sha256")


def config_digest(meta: dict) -> str:
    """sha256 of the canonical JSON of the ``DIGESTED`` entries of a checkpoint's metadata."""
    import hashlib

    return hashlib.sha256(json.dumps({k: meta.get(k) for k in DIGESTED}, sort_keys=True).encode()).hexdigest()


def check_digests(path: Path, meta: dict) -> None:
    """The config must be the one `save_pretrained` wrote (``config_sha256``), and the weights
    file the one written beside it (``weights_sha256``)."""
    recorded = meta.get("config_sha256")
    if recorded is None:
        logger.warning("%s records no config_sha256: its settings are loaded unverified (re-save the routers with "
                       "MindSkipModel.save_pretrained to record one)", path / CONFIG_NAME)
    elif config_digest(meta) != recorded:
        raise ValueError(
            f"{path / CONFIG_NAME} was changed after saving: its settings (config, routed layers, model shapes) no "
            "longer match the config_sha256 it records. Restore the original file; to run the routers with other "
            "settings pass them explicitly (e.g. MindSkipModel.from_pretrained(model, path, threshold=0.6)).")
    check_weights_digest(path, meta)


def check_weights_digest(path: Path, meta: dict) -> None:
    """The weights file must be the one `save_pretrained` wrote beside this config."""
    recorded = meta.get("weights_sha256")
    weights = path / WEIGHTS_NAME
    if recorded is None:
        logger.warning("%s records no weights_sha256: %s is loaded unverified", path / CONFIG_NAME, weights)
        return
    actual = file_sha256(weights)
    if actual != recorded:
        raise ValueError(
            f"{weights} does not match its checkpoint: sha256 {actual[:12]}... but {CONFIG_NAME} records "
            f"{recorded[:12]}... The weights file was replaced or damaged after saving. Restore the original "
            "file, or re-save the routers with MindSkipModel.save_pretrained (which writes both files)."
        )


def read_router_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path / WEIGHTS_NAME} is not a readable safetensors file ({e}); re-save the routers") from e

"""GGUF files (llama.cpp's format) as models: checked, converted once, cached.

Any GGUF file is converted like the embedded model (itself a Q4_1 GGUF): the dequantised weights
become a plain float32 checkpoint under ``cache_dir()/gguf/<stem>-<sha256[:12]>/`` (keyed by the
file's content, so a changed file is a new entry), with the manifest and rebuild rules of
``rt_lib.assets.cache``. Unsupported architectures or tensor types are refused from the header, before
any weight is read.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from rt_lib.assets.cache import MANIFEST, AssetError, build_cached, cache_dir
from rt_lib.assets.packages import EMBEDDED_MODEL_NAMES
from rt_lib.files import file_sha256

log = logging.getLogger("rt_lib.assets.loading")


GGUF_CACHE_VERSION = "1"
# llama.cpp's names of architectures that transformers' GGUF loader spells differently
_GGUF_ARCH_ALIASES = {
    "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
}
_GGUF_NOT_CAUSAL = {"t5", "t5encoder", "umt5"}  # loadable by transformers, but no causal LM
_READERS: dict[tuple[str, str], Any] | None = None  # the open reading of each file, inside one_reading()


@contextlib.contextmanager
def one_reading():
    """Inside: every ``gguf.GGUFReader`` of a file is one reading of it, and the tensor-name map of
    an architecture is made once (both are read-only). transformers reads a GGUF's header anew for
    the tokenizer, the config and the weights, about 10 s each for SmolLM2's 49,152-token
    vocabulary, and makes the same name map for each of the model's ~400 modules; a conversion
    does each once. Re-entrant: nested uses share the outermost one's readings."""
    global _READERS
    if _READERS is not None:
        yield
        return
    from unittest import mock

    import gguf

    new_reader, readers = gguf.GGUFReader, {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = new_reader(path, mode)
        return readers[key]

    _READERS = readers
    try:
        with mock.patch.object(gguf, "GGUFReader", reader), \
                mock.patch.object(gguf, "get_tensor_name_map", functools.lru_cache(None)(gguf.get_tensor_name_map)):
            yield
    finally:
        _READERS = None


def _howto() -> str:
    return ("pass a .gguf file written by llama.cpp (convert_hf_to_gguf.py, llama-quantize), a folder "
            "written by save_pretrained, a hub id 'org/name', or an embedded name: "
            + ", ".join(sorted(EMBEDDED_MODEL_NAMES)))


def _versions(*packages: str) -> str:
    import importlib.metadata

    out = []
    for p in packages:
        try:
            out.append(f"{p} {importlib.metadata.version(p)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{p} (not installed)")
    return " + ".join(out)


@functools.lru_cache(maxsize=None)
def _gguf_support() -> tuple[frozenset[str], frozenset[str], frozenset[str], frozenset[str]]:
    """What the installed transformers can load from a GGUF as a causal LM, read from it:
    ``(architectures, tensor types)`` of its legacy loader (``modeling_gguf_pytorch_utils``, which
    dequantises with the ``gguf`` package) and of its newer loader (``integrations.gguf``)."""
    import gguf
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    legacy = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"} - _GGUF_NOT_CAUSAL
    legacy |= {gguf_name for gguf_name, hf_name in _GGUF_ARCH_ALIASES.items() if hf_name in legacy}
    legacy_types = set()
    for qtype in gguf.GGMLQuantizationType:  # probe: one zero block of each type
        try:
            gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
            legacy_types.add(qtype.name)
        except Exception:  # NotImplementedError for the types the package cannot dequantise
            pass
    try:
        from transformers.integrations.gguf import GGUF_ARCHS
        from transformers.integrations.gguf.dequant import GGML_NAME

        fast, fast_types = set(GGUF_ARCHS), {"F32", "F16", "BF16", *GGML_NAME.values()}
    except ImportError:
        fast, fast_types = set(), set()
    return frozenset(legacy), frozenset(legacy_types), frozenset(fast), frozenset(fast_types)


def _gguf_file(path: str | os.PathLike) -> Path:
    """``path`` as an existing GGUF file (checked by its magic bytes), or a clear AssetError."""
    p = Path(path).expanduser()
    if not p.is_file():
        near = sorted(q.name for q in p.parent.glob("*.gguf")) if p.parent.is_dir() else []
        where = f" (GGUF files in that folder: {', '.join(near[:10])})" if near else ""
        raise AssetError(
            f"no such GGUF file: {p.absolute()}{where}. Check the path; a GGUF from the hub must be "
            f"downloaded first (huggingface-cli download ORG/REPO FILE.gguf on a machine with access) "
            f"and passed as a local file. Or {_howto()}."
        )
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise AssetError(f"{p.absolute()} cannot be read ({e}); check its permissions") from e
    if head != b"GGUF":
        raise AssetError(
            f"{p.absolute()} is not a GGUF file (it starts with {head!r}, not b'GGUF'). For a "
            f"transformers checkpoint pass the folder that holds it; otherwise {_howto()}."
        )
    return p


def check_gguf(gguf_path: Path) -> dict[str, Any]:
    """Architecture and tensor types of a GGUF, read from its header without loading weights;
    an AssetError if transformers cannot load it as a causal LM."""
    from collections import Counter

    import gguf

    try:
        reader = gguf.GGUFReader(gguf_path)
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ValueError("no general.architecture in its metadata")
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
        types = dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))
    except Exception as e:  # truncated or damaged: numpy/struct/ValueError from the reader
        raise AssetError(
            f"GGUF file {gguf_path} cannot be read ({type(e).__name__}: {e}); it may be truncated "
            f"or damaged: copy or download it again"
        ) from e
    legacy, legacy_types, fast, fast_types = _gguf_support()
    versions = _versions("transformers", "gguf")
    listed = ", ".join(sorted((legacy - set(_GGUF_ARCH_ALIASES.values())) | fast))  # as files spell them
    if arch in _GGUF_NOT_CAUSAL:
        raise AssetError(
            f"GGUF file {gguf_path.name} holds a {arch!r} model (encoder-decoder), not a causal LM; "
            f"rt-kit needs a decoder-only model. Supported GGUF architectures: {listed}."
        )
    if arch not in legacy and arch not in fast:
        raise AssetError(
            f"GGUF file {gguf_path.name} holds a {arch!r} model, an architecture that {versions} "
            f"cannot load from GGUF. Supported GGUF architectures: {listed}. "
            f"Fix: load the model's original Hugging Face checkpoint instead (its hub id 'org/name', "
            f"or a folder written by save_pretrained), or a GGUF of a supported architecture."
        )
    supported_types = fast_types if arch in fast else legacy_types
    bad = {t: n for t, n in types.items() if t not in supported_types}
    if bad:
        raise AssetError(
            f"GGUF file {gguf_path.name} ({arch}) stores tensors as "
            f"{', '.join(f'{t} ({n} tensors)' for t, n in bad.items())}, which {versions} cannot "
            f"dequantise. Supported tensor types: {', '.join(sorted(supported_types))}. Fix: "
            f"re-quantise the model's F16/BF16 GGUF with llama.cpp's llama-quantize to a supported "
            f"type (e.g. Q8_0, Q4_K_M, Q4_0 or F16), or load its original Hugging Face checkpoint."
        )
    return {"architecture": arch, "tensor_types": types}


def gguf_tokenizer(gguf_path: Path):
    """The tokenizer transformers builds from a GGUF, checked before it is trusted.

    EOS must be set (generation and evaluation stop on it); a missing pad token becomes EOS;
    inputs must get BOS prepended / EOS appended exactly as the file says
    (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``): transformers 4.x prepended a BOS that
    SmolLM2's file declines, which cost perplexity (see ``_smollm2_tokenizer``).
    """
    from transformers import AutoTokenizer

    try:
        with one_reading():
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _refused("build a tokenizer from", gguf_path, e, "transformers") from e
    def fix(kind: str) -> str:
        return (
            f"add it with gguf-new-metadata (from the gguf package): gguf-new-metadata "
            f"--special-token {kind} '<token>' {gguf_path.name} fixed.gguf, then load fixed.gguf"
        )

    if tok.eos_token is None:
        raise AssetError(
            f"GGUF file {gguf_path.name} names no EOS token (tokenizer.ggml.eos_token_id), which "
            f"generation and evaluation need; {fix('eos')}"
        )
    if tok.pad_token is None:
        log.info("GGUF %s has no pad token; using EOS %r", gguf_path.name, tok.eos_token)
        tok.pad_token = tok.eos_token
    add_bos, add_eos = bool(getattr(tok, "add_bos_token", False)), bool(getattr(tok, "add_eos_token", False))
    if add_bos and tok.bos_token is None:
        raise AssetError(
            f"GGUF file {gguf_path.name} asks for a BOS token before every input "
            f"(tokenizer.ggml.add_bos_token) but names none; {fix('bos')}"
        )
    ids = tok("Hello world").input_ids
    has_bos = tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    has_eos = ids[-1] == tok.eos_token_id
    if (has_bos, has_eos) != (add_bos, add_eos):
        raise AssetError(
            f"the tokenizer transformers builds from GGUF file {gguf_path.name} does not do what the "
            f"file says ('Hello world' -> {ids}: BOS prepended {has_bos}, EOS appended {has_eos}; the "
            f"file asks for {add_bos}, {add_eos}) with {_versions('transformers')}; rt-kit supports "
            f"transformers>=5.24,<6"
        )
    return tok


def _refused(action: str, gguf_path: Path, e: Exception, *packages: str) -> AssetError:
    first = str(e).splitlines()[0] if str(e) else ""
    return AssetError(
        f"transformers cannot {action} GGUF file {gguf_path.name} ({type(e).__name__}: {first}) with "
        f"{_versions(*packages)}; load the model's original Hugging Face checkpoint instead (hub id or "
        "save_pretrained folder)"
    )


def convert_gguf(
    gguf_path: Path, folder: Path, tokenizer=None, name_or_path: str | None = None
) -> dict[str, Any]:
    """Write a GGUF's dequantised weights as a plain float32 checkpoint (+ tokenizer) to ``folder``.

    ``tokenizer``: a checked tokenizer (default ``gguf_tokenizer``); ``name_or_path``: what the
    saved config calls the model (e.g. its hub id).
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    with one_reading():
        tok = tokenizer if tokenizer is not None else gguf_tokenizer(gguf_path)
        # A GGUF-loaded model is marked quantised (save_pretrained and .float() refuse); copy its
        # dequantised weights into a plain model built from the same config. dequantize=True keeps
        # weights unpacked where transformers could leave them in GGUF blocks (its `kernels` path).
        try:
            qmodel = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True),
            )
        except (OSError, ValueError, KeyError, NotImplementedError) as e:
            raise _refused("load", gguf_path, e, "transformers", "gguf") from e
    config = copy.deepcopy(qmodel.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if name_or_path is not None:
        config._name_or_path = name_or_path
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tok.pad_token_id
    top_id = max(tok.get_vocab().values())
    if top_id >= config.vocab_size:
        raise AssetError(
            f"the tokenizer of GGUF file {gguf_path.name} has token ids up to {top_id} but the model "
            f"has {config.vocab_size} embeddings; the file's tokenizer and weights do not match"
        )
    if tok.model_max_length > 1e29 and getattr(config, "max_position_embeddings", None):
        tok.model_max_length = config.max_position_embeddings  # GGUF leaves it unset (1e30)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(qmodel.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(qmodel.generation_config)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    del qmodel
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return {"gguf_size": gguf_path.stat().st_size}


def gguf_model_dir(path: str | os.PathLike) -> Path:
    """The cache folder of a GGUF file, ``cache_dir()/gguf/<stem>-<sha256[:12]>``, converted on
    first use (about 30 s for the 135M SmolLM2; memory about twice the float32 model)."""
    gguf_path = _gguf_file(path).resolve()
    sha = file_sha256(gguf_path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem)[:80]
    target = cache_dir() / "gguf" / f"{stem}-{sha[:12]}"
    cold = not (target / MANIFEST).is_file()

    def build(folder: Path) -> dict[str, Any]:
        with one_reading():
            info = checked or check_gguf(gguf_path)
            out = convert_gguf(gguf_path, folder)
        if file_sha256(gguf_path) != sha:
            raise AssetError(f"{gguf_path} changed while it was being converted; load it again")
        return {"source": f"{gguf_path} (sha256 {sha})", "gguf_sha256": sha, **out, **info}

    with one_reading() if cold else contextlib.nullcontext():  # the check's reading serves the conversion
        # checked before the build (and its lock) when no finished build can exist; never on warm loads
        checked = check_gguf(gguf_path) if cold else None
        return build_cached(target, GGUF_CACHE_VERSION, build, f"GGUF {gguf_path.name!r}")

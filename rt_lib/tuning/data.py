"""Tuning data for Router-Tuning: instruction or plain text -> token sequences with labels.

Two kinds of data:
- instruction data (Alpaca-style ``instruction``/``input``/``output`` fields, chat ``messages``
  lists, or ShareGPT ``conversations``), rendered with the paper's template
  ``<|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n...`` + EOS (open-instruct style, the
  format of the paper's tuning data) or with the tokenizer's own chat template; the loss is
  on the assistant tokens only (labels are -100 elsewhere);
- plain text (a ``text`` column): every token is a label (LM loss).

Sources: a list of dicts, a ``datasets.Dataset``, a local ``.json``/``.jsonl`` file, an
embedded asset name (``"wikipedia-en"``, through ``rt_lib.assets.loading``) or any Hugging Face
dataset name.

Selection is deterministic: a seeded permutation of the source, the first ``num_samples``
entries of it (``skip`` entries later for a disjoint held-out set). Without packing
``num_samples`` counts source examples; with packing it counts packed sequences.
Examples with no label left after truncation are dropped and counted in ``DataStats``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
FORMATS = ("auto", "instruction", "text")
TEMPLATES = ("paper", "chat")

# Embedded data sets that rt_lib.assets.loading serves by name (offline).
EMBEDDED_DATASETS = ("wikipedia-en",)


@dataclass
class DataStats:
    """What ``build_dataset`` did with the source; reported in the training summary."""

    source: str
    split: str | None
    format: str  # "instruction" or "text"
    template: str | None  # "paper" / "chat" for instruction data, None for text
    available: int  # examples in the source (split)
    selected: int  # examples drawn from it (after the seeded permutation)
    dropped_all_masked: int  # examples with no label left (e.g. the response truncated away)
    truncated: int  # examples cut at max_length (before packing)
    sequences: int  # sequences returned
    tokens: int  # tokens in the returned sequences
    label_tokens: int  # tokens that carry a loss (labels != -100, excluding position 0)
    max_length: int
    packing: bool
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- sources
def load_records(source: Any, split: str | None = None) -> list[dict]:
    """Return the examples of ``source`` as a list of dicts.

    ``source``: list/tuple of dicts, a ``datasets.Dataset``, a path to a ``.json`` (a list, or
    a dict holding one list) or ``.jsonl`` file, an embedded name (``"wikipedia-en"``) or a
    Hugging Face dataset name (``split`` defaults to ``"train"``).
    """
    if isinstance(source, (list, tuple)):
        return [dict(r) for r in source]
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        return [dict(r) for r in source]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"unsupported data source of type {type(source).__name__}")
    source = os.fspath(source)
    if source.endswith((".json", ".jsonl")) or os.path.isfile(source):
        return _read_json_records(source)
    if os.path.isdir(source):  # a folder saved with Dataset.save_to_disk / DatasetDict
        import datasets

        ds = datasets.load_from_disk(source)
        if hasattr(ds, "keys"):
            ds = ds[split or "train"]
        return [dict(r) for r in ds]
    from rt_lib.assets import loading as assets  # embedded names offline, anything else from the hub

    ds = assets.load_dataset(source, split=split or "train")
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # DatasetDict
        ds = ds[split or "train"]
    return [dict(r) for r in ds]


def _read_json_records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
        if isinstance(rows, dict):  # {"data": [...]} or {"train": [...]}
            lists = [v for v in rows.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: expected a JSON list of examples or a dict holding one list")
            rows = lists[0]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of JSON objects")
    return rows


def detect_format(records: Sequence[dict], source_name: str = "data") -> str:
    """``"instruction"`` (messages / conversations / instruction+output) or ``"text"``."""
    if not records:
        raise ValueError(f"{source_name}: the data set is empty")
    keys = set(records[0])
    if "messages" in keys or "conversations" in keys or {"instruction", "output"} <= keys:
        return "instruction"
    if "text" in keys:
        return "text"
    raise ValueError(
        f"{source_name}: cannot tell the data format from fields {sorted(keys)}; expected "
        "'messages' (chat), 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca) or 'text'"
    )


def to_messages(record: dict, system_prompt: str | None = None) -> list[dict]:
    """One instruction example as a list of ``{"role", "content"}`` messages."""
    if "messages" in record:
        msgs = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    elif "conversations" in record:  # ShareGPT
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"}
        msgs = [{"role": roles[m["from"]], "content": m["value"]} for m in record["conversations"]]
    elif "instruction" in record and "output" in record:  # Alpaca
        user = str(record["instruction"]).strip()
        extra = str(record.get("input") or "").strip()
        if extra:
            user = f"{user}\n\n{extra}"
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": str(record["output"])}]
        if record.get("system"):
            msgs.insert(0, {"role": "system", "content": str(record["system"])})
    else:
        raise ValueError(f"instruction example without 'messages', 'conversations' or "
                         f"'instruction'+'output' fields: {sorted(record)}")
    if system_prompt and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


# ----------------------------------------------------------------------------- encoding
def _special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text (BOS for Llama-3, nothing for SmolLM2)."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    if ids and tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def _tok(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def paper_segments(messages: list[dict]) -> list[tuple[str | None, bool]]:
    """The paper's template as (text, trained) segments; ``None`` text stands for EOS.

    ``<|system|>\\n{s}\\n<|user|>\\n{u}\\n<|assistant|>\\n{a}<EOS>`` (turns repeat, separated by
    a newline). The loss covers each assistant reply and its EOS.
    """
    segs: list[tuple[str | None, bool]] = []
    prompt = ""
    for m in messages:
        content = str(m["content"]).strip()
        if m["role"] == "system":
            prompt += f"<|system|>\n{content}\n"
        elif m["role"] == "user":
            prompt += f"<|user|>\n{content}\n"
        elif m["role"] == "assistant":
            segs.append((prompt + "<|assistant|>\n", False))
            segs.append((content, True))
            segs.append((None, True))
            prompt = "\n"
        else:
            raise ValueError(f"unknown message role {m['role']!r}")
    return segs


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str | None, bool]]:
    """Segments from the tokenizer's chat template: each assistant turn (with whatever the
    template closes it with, e.g. ``<|im_end|>``) is trained, everything else masked."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("template='chat' but the tokenizer has no chat template; use template='paper'")
    segs: list[tuple[str | None, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the tokenizer's chat template does not render conversations "
                             "incrementally; use template='paper'")
        segs.append((prompt[len(done):], False))
        segs.append((full[len(prompt):], True))
        done = full
    return segs


def encode_segments(tokenizer, segments, prefix: Sequence[int] = ()) -> tuple[list[int], list[int]]:
    """Tokenise each segment on its own, so label masks follow segment boundaries exactly."""
    ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
    for text, trained in segments:
        piece = [tokenizer.eos_token_id] if text is None else _tok(tokenizer, text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def template_overhead(tokenizer, template: str = "paper") -> int:
    """Tokens of a one-turn exchange with empty texts: the least any example needs."""
    msgs = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    if template == "paper":
        ids, _ = encode_segments(tokenizer, paper_segments(msgs), _special_prefix(tokenizer))
    else:
        ids, _ = encode_segments(tokenizer, chat_segments(tokenizer, msgs))
    return len(ids)


def has_labels(labels: Sequence[int]) -> bool:
    """True if some token after the first carries a loss (position 0 is never predicted)."""
    return any(x != IGNORE_INDEX for x in labels[1:])


def select_indices(n_total: int, n: int | None, seed: int, skip: int = 0) -> list[int]:
    """Entries ``skip .. skip+n`` of a seeded permutation of ``range(n_total)``."""
    order = list(range(n_total))
    random.Random(seed).shuffle(order)
    end = n_total if n is None else min(n_total, skip + n)
    return order[skip:end]


def _pack(examples: Iterable[tuple[list[int], list[int]]], max_length: int):
    """Concatenate examples and cut the stream into ``max_length`` blocks; a final partial
    block is kept if it has a label. Attention crosses example boundaries (plain packing)."""
    buf_ids: list[int] = []
    buf_lab: list[int] = []
    for ids, labels in examples:
        buf_ids += ids
        buf_lab += labels
        while len(buf_ids) >= max_length:
            yield buf_ids[:max_length], buf_lab[:max_length]
            buf_ids, buf_lab = buf_ids[max_length:], buf_lab[max_length:]
    if len(buf_ids) >= 2 and has_labels(buf_lab):
        yield buf_ids, buf_lab


def _encoder(tokenizer, fmt: str, template: str, max_length: int, system_prompt: str | None):
    """``record -> (input_ids, labels)`` for data of format ``fmt``; raises if ``max_length``
    leaves no room for a response in the instruction template."""
    if fmt == "instruction":
        overhead = template_overhead(tokenizer, template)
        if max_length <= overhead:
            raise ValueError(f"max_length={max_length} is not longer than the {template!r} template "
                             f"({overhead} tokens for an empty exchange): no response token would fit")
        prefix = _special_prefix(tokenizer) if template == "paper" else []

        def encode(rec):
            msgs = to_messages(rec, system_prompt)
            segs = paper_segments(msgs) if template == "paper" else chat_segments(tokenizer, msgs)
            return encode_segments(tokenizer, segs, prefix)
    else:
        prefix = _special_prefix(tokenizer)

        def encode(rec):
            ids = prefix + _tok(tokenizer, str(rec["text"])) + [tokenizer.eos_token_id]
            return ids, list(ids)
    return encode


def _encode_selected(records: list[dict], order: Iterable[int], encode, stats: DataStats):
    """Yield ``encode(records[i])`` for ``i`` in ``order``: cut at ``stats.max_length`` unless
    packing, without the examples left with no label; counts both in ``stats``."""
    for i in order:
        ids, labels = encode(records[i])
        stats.selected += 1
        if not stats.packing and len(ids) > stats.max_length:
            ids, labels = ids[:stats.max_length], labels[:stats.max_length]
            stats.truncated += 1
        if not has_labels(labels):
            stats.dropped_all_masked += 1
            continue
        yield ids, labels


# ----------------------------------------------------------------------------- datasets
def build_dataset(
    tokenizer,
    source: Any,
    *,
    split: str | None = None,
    format: str = "auto",
    template: str = "paper",
    num_samples: int | None = None,
    max_length: int = 2048,
    packing: bool = False,
    seed: int = 42,
    skip: int = 0,
    system_prompt: str | None = None,
) -> tuple[list[dict], DataStats]:
    """Token sequences ``{"input_ids", "labels"}`` (lists of ints) and what was done.

    Raises ``ValueError`` for a source without the expected fields, a ``max_length`` that
    does not fit the template, or no usable example.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    name = source if isinstance(source, (str, os.PathLike)) else type(source).__name__
    name = os.fspath(name) if isinstance(name, os.PathLike) else name
    records = load_records(source, split)
    fmt = detect_format(records, name) if format == "auto" else format
    _check_fields(records, fmt, name)

    encode = _encoder(tokenizer, fmt, template, max_length, system_prompt)
    stats = DataStats(source=str(name), split=split, format=fmt,
                      template=template if fmt == "instruction" else None,
                      available=len(records), selected=0, dropped_all_masked=0, truncated=0,
                      sequences=0, tokens=0, label_tokens=0, max_length=max_length,
                      packing=packing, seed=seed)
    if packing:
        # num_samples/skip count packed sequences: encode the permuted source lazily until
        # enough blocks exist (large sources are not tokenised in full).
        order = select_indices(len(records), None, seed)
        want = None if num_samples is None else skip + num_samples
        seqs = []
        for block in _pack(_encode_selected(records, order, encode, stats), max_length):
            seqs.append(block)
            if want is not None and len(seqs) >= want:
                break
        seqs = seqs[skip:]
    else:
        order = select_indices(len(records), num_samples, seed, skip)
        seqs = list(_encode_selected(records, order, encode, stats))

    out = [{"input_ids": ids, "labels": labels} for ids, labels in seqs]
    stats.sequences = len(out)
    stats.tokens = sum(len(e["input_ids"]) for e in out)
    stats.label_tokens = sum(sum(x != IGNORE_INDEX for x in e["labels"][1:]) for e in out)
    if stats.dropped_all_masked:
        logger.warning("%s: dropped %d of %d examples whose labels were all masked (max_length=%d)",
                       name, stats.dropped_all_masked, stats.selected, max_length)
    if not out:
        raise ValueError(f"{name}: no usable example ({stats.selected} selected, "
                         f"{stats.dropped_all_masked} without any label after truncation to {max_length})")
    return out, stats


def _check_fields(records: list[dict], fmt: str, name: str) -> None:
    if not records:
        raise ValueError(f"{name}: the data set is empty")
    keys = set(records[0])
    if fmt == "text" and "text" not in keys:
        raise ValueError(f"{name}: format 'text' needs a 'text' field; fields are {sorted(keys)}")
    if fmt == "instruction" and not ("messages" in keys or "conversations" in keys
                                     or {"instruction", "output"} <= keys):
        raise ValueError(f"{name}: instruction data needs 'messages', 'conversations' or "
                         f"'instruction'+'output' fields; fields are {sorted(keys)}")


def collate(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: ``input_ids``, ``attention_mask``, ``labels``
    (``-100`` on padding). Shapes ``(B, T)``."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or EOS when it has none (padding is masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def byte_tokenizer():
    """A byte-level tokenizer built in memory (259 ids: ``<s>``, ``</s>``, ``<pad>`` and the 256
    bytes): no files, no downloads. For tests that need a tokenizer but no model files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")

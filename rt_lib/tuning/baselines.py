"""Baselines that share the kit's tuning, evaluation and profiling paths.

- Static attention drop (He et al., "What Matters in Transformers?", arXiv 2406.15786): score
  each attention sublayer by ``1 - cos(h_in, h_out)`` of the residual stream around it, over
  calibration text; remove the ``k`` lowest-scoring sublayers for every input
  (``rt_lib.mindskip.model.drop_sublayers``).
- Full-parameter dynamic depth: routers and backbone trained together
  (``train_routers(..., trainable="full")``).
- LoRA + Router-Tuning: LoRA adapters (peft) and routers trained together, saved side by side
  (``train/routers/`` + ``train/lora/``) and loaded together.

    drop = static_attention_drop(model, k=4, tokenizer=tok)   # scores, layers, handle
    drop.scores, drop.layers; ...; drop.restore()
    res = train_lora_routers("cpu", out="results/runs/lora")
    ms, peft_model = load_lora_routers(base_model, "results/runs/lora/train")
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rt_lib.tuning.data import build_dataset, collate, pad_token_id

logger = logging.getLogger(__name__)

STATIC_DROP_FILE = "static_drop.json"


# =============================================================================== static drop
def _residual_after_attention(layer):
    """The module whose input is the residual stream right after the attention sublayer:
    ``pre_feedforward_layernorm`` (Gemma2/3: attention output is normed, then added) or
    ``post_attention_layernorm`` (Llama, Mistral, Qwen, Phi3: ``h + attn(...)`` goes into it)."""
    return getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm


@torch.no_grad()
def attention_importance(model, tokenizer=None, *, examples: list[dict] | None = None, data: Any = "wikipedia-en",
                         split: str | None = "train", num_samples: int = 64, max_length: int = 256,
                         packing: bool = True, batch_size: int = 4, seed: int = 42) -> tuple[dict[int, float], dict]:
    """``{layer: 1 - cos(h_in, h_out)}`` averaged over the real tokens of the calibration
    sequences, and a description of the calibration data.

    ``h_in`` is the decoder layer's input, ``h_out`` the residual stream after its attention
    sublayer (before the MLP). A layer whose attention leaves the stream unchanged scores 0.
    Calibration: ``examples`` (token sequences from ``rt_lib.tuning.data``) or ``num_samples``
    sequences of ``data`` (default: packed 256-token blocks of the embedded Wikipedia text).
    """
    from rt_lib.mindskip.architecture import find_decoder

    if examples is None:
        tokenizer = tokenizer or _tokenizer_for(model)
        examples, stats = build_dataset(tokenizer, data, split=split, num_samples=num_samples, max_length=max_length,
                                        packing=packing, seed=seed, format="text")
        calib = stats.to_dict()
        pad = pad_token_id(tokenizer)
    else:
        calib = {"source": "<given examples>", "sequences": len(examples)}
        pad = pad_token_id(tokenizer) if tokenizer is not None else 0
    _, layers = find_decoder(model)
    device = next(model.parameters()).device
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0.0
    state: dict[str, Any] = {}

    def grab_input(i):
        def hook(module, args, kwargs):
            state[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return hook

    def score_output(i):
        def hook(module, args):
            h_in, h_out = state.pop(i).float(), args[0].float()  # (B, T, d)
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)  # (B, T)
            sums[i] += ((1.0 - cos) * state["mask"]).sum().double().cpu()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(grab_input(i), with_kwargs=True))
        handles.append(_residual_after_attention(layer).register_forward_pre_hook(score_output(i)))
    was_training = model.training
    model.eval()
    try:
        for j in range(0, len(examples), batch_size):
            b = {k: v.to(device) for k, v in collate(examples[j:j + batch_size], pad).items()}
            state["mask"] = b["attention_mask"].float()
            count += float(b["attention_mask"].sum())
            # the scores come from hooks on the layers: no vocabulary logits, no cache
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    calib["tokens_scored"] = int(count)
    return {i: float(sums[i] / count) for i in range(len(layers))}, calib


def droppable_layers(model) -> list[int]:
    """Layers whose attention may be removed (Hugging Face reads the cache length from layer 0
    and the first full-attention layer; the core refuses to drop them)."""
    from rt_lib.mindskip.architecture import cache_reference_layers, find_decoder

    _, layers = find_decoder(model)
    return [i for i in range(len(layers)) if i not in cache_reference_layers(model)]


def choose_lowest(scores: dict[int, float], k: int, candidates: list[int] | None = None) -> list[int]:
    """The ``k`` candidates with the lowest scores (ties broken by layer index), sorted."""
    pool = sorted(scores) if candidates is None else sorted(candidates)
    missing = [i for i in pool if i not in scores]
    if missing:
        raise ValueError(f"no importance score for layers {missing}")
    if not 0 <= k <= len(pool):
        raise ValueError(f"k={k} must be between 0 and the {len(pool)} candidate layers")
    return sorted(sorted(pool, key=lambda i: (scores[i], i))[:k])


@dataclass
class StaticDrop:
    """Result of ``static_attention_drop``: importance per layer, the dropped layers, the handle
    that puts them back."""

    scores: dict[int, float]
    layers: list[int]
    k: int
    candidates: list[int]
    calibration: dict
    handle: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {"method": "static attention drop (arXiv 2406.15786): drop the k lowest 1 - cos(h_in, h_out)",
                "k": self.k, "layers": self.layers, "candidates": self.candidates,
                "scores": {str(i): s for i, s in self.scores.items()}, "calibration": self.calibration}

    def save(self, path) -> Path:
        from rt_lib.files import atomic_write_json

        return atomic_write_json(path, self.to_dict())

    def restore(self):
        return self.handle.restore() if self.handle is not None else None


def static_attention_drop(model, k: int, tokenizer=None, *, candidates: list[int] | None = None,
                          scores: dict[int, float] | None = None, scored_on: dict | None = None,
                          apply: bool = True, out=None, **calibration) -> StaticDrop:
    """Score the attention sublayers, choose the ``k`` least important among ``candidates``
    (default: every droppable layer) and, with ``apply``, remove them from ``model`` in place.
    ``scores``: importance scores computed before (``attention_importance``), with
    ``scored_on`` the description of the text they were computed on (recorded with the
    choice). ``out``: a run folder; the result is saved as ``<out>/baselines/static_drop.json``."""
    from rt_lib.mindskip.removal import drop_sublayers

    calib = dict(scored_on) if scored_on is not None else {"source": "<given scores>"}
    if scores is None:
        scores, calib = attention_importance(model, tokenizer, **calibration)
    pool = droppable_layers(model) if candidates is None else sorted(candidates)
    layers = choose_lowest(scores, k, pool)
    handle = drop_sublayers(model, layers, granularity="attn") if apply and layers else None
    result = StaticDrop(scores=scores, layers=layers, k=k, candidates=pool, calibration=calib, handle=handle)
    if out is not None:
        result.save(Path(out) / "baselines" / STATIC_DROP_FILE)
    return result


def static_drop_layers(model, k: int, tokenizer=None, **calibration) -> list[int]:
    """Just the layer choice (used by rt_lib.speed.profiling for its ``static_drop`` variant)."""
    return static_attention_drop(model, k, tokenizer, apply=False, **calibration).layers


def _tokenizer_for(model):
    """The tokenizer of a model loaded by rt_lib.assets.loading (or from the hub / a folder by its name)."""
    from transformers import AutoTokenizer

    name = getattr(model.config, "rt_kit_name", None)
    try:
        from rt_lib.assets import loading as assets

        if name in assets.EMBEDDED_MODELS:
            return AutoTokenizer.from_pretrained(str(assets.embedded_model_dir(name)))
    except ImportError:
        pass
    source = name or getattr(model.config, "_name_or_path", "")
    if not source:
        raise ValueError("pass the tokenizer: the model does not record where it was loaded from")
    return AutoTokenizer.from_pretrained(source)


# =============================================================================== trained baselines
def train_full(recipe: str | None = "cpu", **options):
    """Full-parameter dynamic depth: routers and every backbone weight trained by the same loop."""
    from rt_lib.tuning.train import train_routers

    return train_routers(recipe, trainable="full", **options)


def train_lora_routers(recipe: str | None = "cpu", **options):
    """LoRA + Router-Tuning: LoRA adapters and routers trained together (``lora_*`` options)."""
    from rt_lib.tuning.train import train_routers

    return train_routers(recipe, trainable="lora", **options)


def load_lora_routers(model, train_dir):
    """Attach the routers (``train_dir/routers``) and the LoRA adapter (``train_dir/lora``)
    saved by a ``trainable="lora"`` run to ``model``. Returns ``(ms, peft_model)``; run
    inference through ``peft_model``."""
    from peft import PeftModel

    from rt_lib.mindskip.model import MindSkipModel

    train_dir = Path(train_dir)
    if not (train_dir / "lora" / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{train_dir / 'lora'} holds no LoRA adapter (adapter_config.json)")
    ms = MindSkipModel.from_pretrained(model, train_dir / "routers", strict_base=False)
    peft_model = PeftModel.from_pretrained(ms.model, str(train_dir / "lora"))
    peft_model.eval()
    return ms, peft_model


def load_full(model, train_dir):
    """Load a ``trainable="full"`` run: backbone weights (``backbone.safetensors``) into
    ``model``, then its routers. Returns the MindSkip model."""
    from safetensors.torch import load_file

    from rt_lib.mindskip.model import MindSkipModel

    train_dir = Path(train_dir)
    ms = MindSkipModel.from_pretrained(model, train_dir / "routers", strict_base=False)
    state = load_file(str(train_dir / "backbone.safetensors"))
    missing, unexpected = ms.model.load_state_dict(state, strict=False)
    missing = [n for n in missing if "mindskip_router" not in n]
    if missing or unexpected:
        raise ValueError(f"{train_dir}/backbone.safetensors does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return ms

"""What MindSkip needs to know about a Hugging Face decoder: where its layers are, which layers
may be routed, which module a granularity gates, and each layer's attention window.

Supported: Llama-shaped causal LMs whose decoder layers have `self_attn`, `mlp`,
`input_layernorm` and `post_attention_layernorm` (Llama, Mistral, Qwen2/3, Gemma2/3, Phi3, ...),
and the mixture-of-experts models shaped the same way, whose `mlp` is a sparse MoE block
(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; `rt_lib.mindskip.moe`).
"""

from __future__ import annotations

import logging

from torch import nn

from rt_lib.mindskip.config import KV_GRANULARITIES, MindSkipConfig
from rt_lib.mindskip.moe import moe_layers

logger = logging.getLogger(__name__)

REQUIRED_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def find_decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module owning the decoder layers and the layer list, or a clear error."""
    candidates = []
    inner = getattr(model, "model", None)
    if inner is not None:
        candidates.append(inner)
        if getattr(inner, "language_model", None) is not None:
            candidates.append(inner.language_model)
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except Exception:  # noqa: BLE001 - some models raise here; the other candidates remain
            pass
    candidates.append(model)
    for dec in candidates:
        layers = getattr(dec, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return dec, layers
    raise ValueError(
        f"{type(model).__name__} is not a supported decoder: no `model.layers` ModuleList found. "
        "MindSkip supports Llama-shaped causal LMs (Llama, Mistral, Qwen2/3, Gemma2/3, Phi3, ...)."
    )


def check_architecture(model: nn.Module) -> None:
    _, layers = find_decoder(model)
    for i, layer in enumerate(layers):
        base = getattr(layer, "base_layer", layer)  # a layer wrapped by a block gate
        missing = [p for p in REQUIRED_LAYER_PARTS if not hasattr(base, p)]
        if missing:
            raise ValueError(
                f"{type(model).__name__}: decoder layer {i} ({type(base).__name__}) lacks {missing}. MindSkip needs "
                f"Llama-shaped layers with {list(REQUIRED_LAYER_PARTS)}."
            )
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa"):
        logger.warning("attention implementation %r: seq routing works; token routing needs eager or sdpa", impl)


def cache_reference_layers(model: nn.Module) -> set[int]:
    """Layers whose cache length Hugging Face reads (sequence length, mask sizes).

    Layer 0 gives `cache.get_seq_length()`; the first full-attention layer gives the mask
    sizes. Skipping their attention would leave those caches empty, so they cannot be routed
    at `attn`/`block` granularity.
    """
    ref = {0}
    types = getattr(model.config, "layer_types", None)
    if types:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        if full:
            ref.add(full[0])
    return ref


def excluded_layers(model: nn.Module, granularity: str) -> dict[int, str]:
    """Layers `granularity` cannot route in `model`, each with the reason.

    At `attn`/`block` granularity, the layers Hugging Face reads the cache length from
    (`cache_reference_layers`). At `moe` granularity, the layers whose MLP slot is not a sparse
    MoE block (Qwen2/3-MoE's `mlp_only_layers`, a dense model's every layer); at `mlp`
    granularity, the layers whose MLP slot is one (an MoE block is gated as `moe`).
    """
    _, layers = find_decoder(model)
    out: dict[int, str] = {}
    if granularity in KV_GRANULARITIES:
        out.update({i: "Hugging Face reads the cache length from it" for i in cache_reference_layers(model)})
    if granularity in ("mlp", "moe"):
        moe = set(moe_layers(layers))
        for i in range(len(layers)):
            if granularity == "moe" and i not in moe:
                out[i] = "its MLP is dense, not a sparse MoE block (use granularity 'mlp' for it)"
            elif granularity == "mlp" and i in moe:
                out[i] = "its MLP slot is a sparse MoE block (use granularity 'moe' for it)"
    return out


def routed_layers_for(model: nn.Module, config: MindSkipConfig) -> list[int]:
    """The layers `config` routes in `model`.

    The default range (the `num_routed_layers` deepest layers except the last) leaves out the
    layers `excluded_layers` names (at `attn`/`block` granularity the layers Hugging Face reads
    the cache length from; at `moe` the layers without a sparse MoE block, at `mlp` those with
    one) and logs their indices; an explicit `routed_layers` list naming one of them is an error.
    """
    _, layers = find_decoder(model)
    excluded = excluded_layers(model, config.granularity)
    if config.routed_layers is not None:
        routed = config.resolve_layers(len(layers))
        bad = sorted(set(excluded) & set(routed))
        if bad:
            reasons = "; ".join(f"layer {i}: {excluded[i]}" for i in bad)
            raise ValueError(f"layers {bad} cannot be routed at {config.granularity!r} granularity ({reasons}). "
                             "Route other layers.")
        return routed
    if config.granularity == "moe" and len(excluded) == len(layers):
        raise ValueError(f"{type(model).__name__} has no sparse MoE block (a layer.mlp with an expert router `gate` "
                         "and `experts`): granularity 'moe' applies to MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, "
                         "OLMoE); use 'mlp' for a dense model")
    if config.granularity == "mlp" and len(excluded) == len(layers):
        raise ValueError(f"every layer of {type(model).__name__} holds a sparse MoE block where a dense model holds "
                         "its MLP: gate them with granularity 'moe'")
    routed = config.resolve_layers(len(layers), exclude=excluded)
    full = config.resolve_layers(len(layers))
    left_out = sorted(set(full) - set(routed))
    if left_out:
        reasons = sorted({excluded[i] for i in left_out})
        logger.warning("MindSkip: default routed layers leave out %s (%s); routing %d layers: %s", left_out,
                       "; ".join(reasons), len(routed), routed)
    return routed


def sliding_window(layer: nn.Module, layer_idx: int, config) -> int | None:
    """The attention window of decoder layer `layer_idx`, or None for full attention.

    Models with per-layer types (Gemma2/3, Qwen2/3) keep it on the attention module or mark the
    layer `sliding_attention`; Mistral and Phi3 apply `config.sliding_window` to every layer.
    """
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(attn, "sliding_window"):
        return attn.sliding_window or None
    types = getattr(config, "layer_types", None)
    if types:
        return getattr(config, "sliding_window", None) if types[layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None) or None


_SLOT = {"attn": "self_attn", "mlp": "mlp", "moe": "mlp"}  # block granularity: the decoder layer itself


def get_slot(layers: nn.ModuleList, i: int, granularity: str) -> nn.Module:
    """The module of layer i that `granularity` gates (or removes)."""
    return layers[i] if granularity == "block" else getattr(layers[i], _SLOT[granularity])


def set_slot(layers: nn.ModuleList, i: int, granularity: str, module: nn.Module) -> None:
    if granularity == "block":
        layers[i] = module
    else:
        setattr(layers[i], _SLOT[granularity], module)

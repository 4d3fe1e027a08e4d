"""Memory arithmetic of the plan (``rt_lib.pipeline.plan``): the model on the meta device, its shape,
bytes per dtype, activation bytes per token kept for the backward pass, and the loss's logits."""

from __future__ import annotations

import logging

from rt_lib.pipeline.plan_assets import PlanInputError, quiet

log = logging.getLogger(__name__)


def meta_model(config, dtype: str):
    """The causal LM of ``config`` on the meta device: shapes and parameter count, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with quiet(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))


def model_shape(config) -> dict:
    """The sizes of ``config`` the plan reports and estimates from; an MoE config adds its
    sparse blocks' sizes (``experts``, ``top_k``, ``expert_intermediate``, ``shared_intermediate``,
    ``sparse_layers``: ``rt_lib.speed.roofline.Shape``)."""
    from rt_lib.speed.roofline import Shape

    s = Shape.from_config(config)
    out = {"architecture": (getattr(config, "architectures", None) or [type(config).__name__])[0],
           "layers": s.num_layers, "hidden": s.hidden, "heads": s.heads, "kv_heads": s.kv_heads,
           "head_dim": s.head_dim, "intermediate": s.intermediate, "vocab": s.vocab,
           "max_positions": getattr(config, "max_position_embeddings", None),
           "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False))}
    if s.experts:
        out.update(experts=s.experts, top_k=s.top_k, expert_intermediate=s.expert_intermediate,
                   shared_intermediate=s.shared_intermediate, sparse_layers=s.sparse_layers)
    return out


def roofline_shape(shape: dict):
    """The ``rt_lib.speed.roofline.Shape`` of a ``model_shape`` dict (the profiler's cost and
    memory estimates, MoE blocks included)."""
    from rt_lib.speed.roofline import Shape

    moe = {k: shape[k] for k in ("experts", "top_k", "expert_intermediate", "shared_intermediate", "sparse_layers")
           if k in shape}
    return Shape(shape["layers"], shape["hidden"], shape["heads"], shape["kv_heads"], shape["head_dim"],
                 shape["intermediate"], shape["vocab"], **moe)


_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


def dtype_bytes(name: str) -> int:
    key = str(name).removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise PlanInputError(f"unknown dtype {name!r}: use float32, bfloat16 or float16")
    return _DTYPE_BYTES[key]


def activation_bytes_per_token(shape: dict, routed: list[int], granularity: str, route_level: str, nbytes: int,
                               trainable: str = "routers", seq_len: int = 2048) -> dict:
    """Bytes per token that one micro batch keeps for the backward pass of Router-Tuning.

    ``b`` = bytes of the activations' dtype, ``h`` hidden size, ``q`` = heads x head_dim,
    ``kv`` = kv_heads x head_dim, ``I`` the MLP width. Counted from what autograd saves; on a
    small Llama (tests/test_plan.py, ``torch.autograd.graph.saved_tensors_hooks``) the count
    is within 2% of the saved tensors with sequence routing and within 10% with token routing:

    - a frozen linear layer keeps nothing (its weight is all its input gradient needs);
    - a layer below the first routed one keeps nothing: no tensor there needs a gradient;
    - every layer above the first routed one keeps ``8h`` (the float32 inputs of its two
      RMSNorms) + ``b(2q + 2kv)`` (queries, keys, values and the attention output for SDPA's
      backward) + ``4 x heads`` (log-sum-exp) + ``3bI`` (SwiGLU: gate, its SiLU, up);
    - a routed layer also keeps its gated sublayer output, ``bh`` (the straight-through product
      with the decision), and with token routing the router's float32 input, ``4h``; a
      token-routed attention (``attn``/``block``) runs with an explicit mask over the kept
      tokens, so it keeps keys and values repeated to every head (``2bq`` instead of ``2bkv``),
      a mask row of ``b x seq_len`` and 32 bytes of token indices;
    - the first routed layer keeps only what lies above its router: at ``attn`` granularity the
      gated output, the second RMSNorm input and the MLP, ``bh + 4h + 3bI``; at ``mlp`` and
      ``block`` granularity the gated output ``bh``;
    - the final RMSNorm keeps ``4h``.

    ``trainable="full"`` or ``"lora"``: every layer keeps the above plus the inputs of its
    linear layers, ``b(2h + q + I)`` (estimate; LoRA dropout masks are left out).
    Activations of a micro batch = ``micro_batch x max_length x total``.
    """
    h, inter, heads = shape["hidden"], shape["intermediate"], shape["heads"]
    q, kv, b = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"], nbytes
    full_layer = 8 * h + b * (2 * q + 2 * kv) + 4 * heads + 3 * b * inter
    per_layer: dict[int, int] = {}
    routed_set = set(routed)
    token_in = 4 * h if route_level == "token" else 0
    # a token-routed attention: repeated keys/values, the mask row and the kept-token indices
    masked_attn = b * (2 * q - 2 * kv) + b * seq_len + 32 if route_level == "token" and granularity in ("attn", "block") else 0
    if trainable == "routers":
        first = min(routed)
        for i in range(first, shape["layers"]):
            if i == first:
                per_layer[i] = (b * h + 4 * h + 3 * b * inter if granularity == "attn" else b * h) + token_in
            else:
                per_layer[i] = full_layer + ((b * h + token_in + masked_attn) if i in routed_set else 0)
    else:
        for i in range(shape["layers"]):
            extra = (b * h + token_in + masked_attn) if i in routed_set else 0
            per_layer[i] = full_layer + b * (2 * h + q + inter) + extra
    total = sum(per_layer.values()) + 4 * h
    return {"per_token": total, "layers_keeping": len(per_layer), "per_layer": per_layer}


def loss_bytes_per_token(vocab: int, nbytes: int) -> int:
    """The LM loss's working set per token: the logits in the model's dtype, their float32 copy
    (none when already float32), the float32 log-softmax kept for the backward pass and its
    float32 gradient."""
    return vocab * (nbytes + (4 if nbytes != 4 else 0) + 4 + 4)


# ============================================================================ data and tasks

"""Analytic cost of a Llama-family decoder, dense or with sparse mixture-of-experts (MoE)
blocks: the roofline estimate the profiler reports beside its measurements, and the memory
estimate it uses to skip grid points that cannot fit.

Each attention sublayer, MLP sublayer, sparse MoE block and the LM head of one forward costs
`max(flops / peak_flops, bytes / bandwidth)` (a per-operation roofline). Removing sublayers
of the routers' granularity (attention, MLP, MoE blocks or whole layers) removes their terms, so

    bound_speedup = dense time / time without the removed sublayers

is what skipping them could reach at best on a device with those peaks. It ignores per-kernel
launch and Python overhead, which removing a sublayer also saves, so on a small model measured
speedups can exceed it. `measure_peaks` gives achievable peaks of the device at hand.

Everything here is arithmetic on `Shape` (the sizes of the model) except `measure_peaks`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

REGIMES = ("prefill", "decode")
GRANULARITIES = ("attn", "mlp", "block", "moe")


@dataclass
class Shape:
    """The sizes of a Llama-family decoder that set its cost. An MoE model (Mixtral, Qwen2-MoE,
    Qwen3-MoE, OLMoE) adds the sizes of its sparse blocks: ``experts`` routed experts of width
    ``expert_intermediate``, ``top_k`` of them per token, a shared expert of width
    ``shared_intermediate`` (Qwen2-MoE; 0: none), in ``sparse_layers`` of the layers; the
    other layers hold a dense MLP of width ``intermediate``. A dense model has ``experts=0``."""
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int = 0
    top_k: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    sparse_layers: int = 0

    @classmethod
    def from_config(cls, config, sparse_layers: int | None = None) -> Shape:
        """The shape of ``config``. An MoE config's sparse layers are counted by the families'
        rule (every ``decoder_sparse_step``-th layer not in ``mlp_only_layers``; every layer of
        Mixtral and OLMoE) unless ``sparse_layers`` gives the count read off the model."""
        heads = config.num_attention_heads
        layers = config.num_hidden_layers
        experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
        moe = {}
        if experts:
            if sparse_layers is None:
                dense_only = set(getattr(config, "mlp_only_layers", None) or [])
                step = getattr(config, "decoder_sparse_step", None) or 1
                sparse_layers = sum(1 for i in range(layers) if i not in dense_only and (i + 1) % step == 0)
            moe = dict(experts=int(experts), top_k=int(config.num_experts_per_tok),
                       expert_intermediate=getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
                       shared_intermediate=getattr(config, "shared_expert_intermediate_size", None) or 0,
                       sparse_layers=int(sparse_layers))
        return cls(
            num_layers=layers,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            **moe,
        )

    @property
    def dense_layers(self) -> int:
        """Layers with a dense MLP (every layer of a dense model)."""
        return self.num_layers - self.sparse_layers


def experts_touched(shape: Shape, tokens: int) -> float:
    """Expected number of distinct experts of one sparse block that ``tokens`` tokens pick, each
    ``top_k`` of ``experts``, under uniform routing: ``E (1 - (1 - k/E)^n)``. Only these experts'
    weights need reading (transformers' eager experts loop over the experts hit; its grouped
    matrix product gives the others empty groups): ``top_k`` for one token, all of them for a
    long prompt."""
    if not shape.experts:
        return 0.0
    return shape.experts * (1.0 - (1.0 - shape.top_k / shape.experts) ** max(tokens, 0))


def step_costs(shape: Shape, batch: int, new: int, past: int, dtype_bytes: int, head_tokens: int | None = None):
    """(flops, bytes) of one attention sublayer, one MLP sublayer, one sparse MoE block (MoE
    shapes only, key ``moe``) and the LM head for one forward of `new` tokens per sequence on top
    of `past` cached ones. A multiply-add is 2 flops.

    Attention: Q/K/V/O projections, scores and values over the causal context (query i sees
    past + i + 1 keys); bytes = weights once + cached keys/values read once + new ones written
    + the sublayer's input/output and its intermediates (q, k, v, attention output) written
    and read once. MLP: gate/up/down; bytes = weights + input/output + 3 intermediates written
    and read. Head: final projection for `head_tokens` per sequence (1 with logits_to_keep=1).
    Norms, RoPE and softmax are elementwise and left out.
    """
    s, b, t = shape, batch, new
    q_dim, kv_dim = s.heads * s.head_dim, s.kv_heads * s.head_dim
    keys_seen = t * past + t * (t + 1) // 2  # sum over queries of visible keys
    attn_flops = 2 * b * t * s.hidden * (2 * q_dim + 2 * kv_dim) + 4 * b * s.heads * s.head_dim * keys_seen
    attn_bytes = dtype_bytes * (
        s.hidden * (2 * q_dim + 2 * kv_dim)                 # weights
        + b * 2 * kv_dim * (past + t)                       # cache read (incl. the new entries)
        + b * 2 * kv_dim * t                                # cache write
        + b * t * (2 * s.hidden + 2 * (2 * q_dim + 2 * kv_dim))  # in/out + intermediates
    )
    mlp_flops = 2 * b * t * s.hidden * s.intermediate * 3
    mlp_bytes = dtype_bytes * (3 * s.hidden * s.intermediate + b * t * (2 * s.hidden + 2 * 3 * s.intermediate))
    h = t if head_tokens is None else head_tokens
    head_flops = 2 * b * h * s.hidden * s.vocab
    head_bytes = dtype_bytes * (s.hidden * s.vocab + b * h * (s.hidden + s.vocab))
    out = {"attn": (attn_flops, attn_bytes), "mlp": (mlp_flops, mlp_bytes), "head": (head_flops, head_bytes)}
    if s.experts:
        n, k, w, sw = b * t, s.top_k, s.expert_intermediate, s.shared_intermediate
        shared_flops = 2 * n * s.hidden * (3 * sw + 1) if sw else 0
        moe_flops = 2 * n * s.hidden * s.experts + 2 * n * k * s.hidden * w * 3 + shared_flops
        weights = (s.hidden * s.experts + experts_touched(s, n) * 3 * s.hidden * w
                   + (s.hidden * (3 * sw + 1) if sw else 0))
        acts = n * 2 * s.hidden + n * k * (2 * s.hidden + 2 * 3 * w) + (n * 2 * 3 * sw if sw else 0)
        out["moe"] = (moe_flops, dtype_bytes * (weights + acts))
    return out


def op_seconds(cost: tuple[float, float], peak_flops: float, bandwidth: float) -> float:
    """Roofline time of one operation: compute-bound or memory-bound, whichever is slower."""
    flops, nbytes = cost
    return max(flops / peak_flops, nbytes / bandwidth)


def regime_time(shape: Shape, regime: str, batch: int, seq_len: int, removed: float,
                peak_flops: float, bandwidth: float, dtype_bytes: int, new_tokens: int = 1,
                granularity: str = "attn") -> float:
    """Roofline seconds of one prefill forward, or per generated token in decode (averaged over
    `new_tokens` steps from a context of `seq_len`), with `removed` sublayers of `granularity`
    gone (attn: attention sublayers, mlp: dense MLP sublayers, moe: sparse MoE blocks, block:
    whole layers; on a model with both dense and sparse layers a removed layer's MLP slot costs
    the mean over its layers)."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if granularity == "moe" and not shape.sparse_layers:
        raise ValueError("granularity 'moe' removes sparse MoE blocks; this shape has none (a dense model, or "
                         "Shape without its experts: build it with Shape.from_config)")
    if granularity == "mlp" and not shape.dense_layers:
        raise ValueError("granularity 'mlp' removes dense MLPs; every layer of this shape holds a sparse MoE block "
                         "(granularity 'moe')")
    no_attn = removed if granularity in ("attn", "block") else 0.0
    if regime == "prefill":
        steps = [step_costs(shape, batch, seq_len, 0, dtype_bytes, head_tokens=1)]
    elif regime == "decode":
        steps = [step_costs(shape, batch, 1, seq_len + i, dtype_bytes) for i in range(max(new_tokens, 1))]
    else:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    total = 0.0
    for c in steps:
        t_attn = op_seconds(c["attn"], peak_flops, bandwidth)
        t_mlp = op_seconds(c["mlp"], peak_flops, bandwidth)
        t_moe = op_seconds(c["moe"], peak_flops, bandwidth) if "moe" in c else 0.0
        ffn = shape.dense_layers * t_mlp + shape.sparse_layers * t_moe
        saved = {"attn": 0.0, "mlp": removed * t_mlp, "moe": removed * t_moe,
                 "block": removed * ffn / shape.num_layers}[granularity]
        total += (shape.num_layers - no_attn) * t_attn + ffn - saved
        total += op_seconds(c["head"], peak_flops, bandwidth)
    return total / len(steps)


def bound_speedup(shape: Shape, regime: str, batch: int, seq_len: int, removed: float,
                  peak_flops: float, bandwidth: float, dtype_bytes: int, new_tokens: int = 1,
                  granularity: str = "attn") -> float:
    """Predicted oracle speedup: dense roofline time / time without `removed` sublayers of
    `granularity` (fractional: a sublayer skipped for half of the rows counts 0.5)."""
    args = (peak_flops, bandwidth, dtype_bytes, new_tokens, granularity)
    dense = regime_time(shape, regime, batch, seq_len, 0, *args)
    return dense / regime_time(shape, regime, batch, seq_len, removed, *args)


def bound_curves(shape: Shape, points, n_routed: int, peak_flops: float, bandwidth: float, dtype_bytes: int,
                 new_tokens: int, granularity: str = "attn") -> list[dict]:
    """The bound at every number of removed routed sublayers (0..n_routed), per grid point
    `(regime, batch, seq_len)`: the curves drawn beside the measured speedups."""
    out = []
    for regime, batch, seq_len in points:
        n = max(new_tokens, 1) if regime == "decode" else 1
        out.append({"regime": regime, "batch_size": batch, "seq_len": seq_len,
                    "skip_ratio": [k / n_routed for k in range(n_routed + 1)],
                    "bound_speedup": [bound_speedup(shape, regime, batch, seq_len, k, peak_flops, bandwidth,
                                                    dtype_bytes, n, granularity) for k in range(n_routed + 1)]})
    return out


def estimate_kv_bytes(shape: Shape, tokens: int, dtype_bytes: int, layers: int | None = None) -> int:
    """Keys and values of ``tokens`` cached tokens (batch x length summed) in ``layers`` layers
    (default: all): ``2 x layers x kv_heads x head_dim x tokens x bytes``."""
    n = shape.num_layers if layers is None else layers
    if not 0 <= n <= shape.num_layers:
        raise ValueError(f"{n} layers with a KV cache: a model of {shape.num_layers} layers has 0..{shape.num_layers}")
    return 2 * n * shape.kv_heads * shape.head_dim * tokens * dtype_bytes


def estimate_point_bytes(shape: Shape, regime: str, batch: int, seq_len: int, new_tokens: int, dtype_bytes: int) -> int:
    """Upper estimate of what one grid point allocates beyond the weights: the dense KV cache,
    one layer's activations, a fully materialised score matrix and the last-token logits. An
    MoE layer's activations per token: its expert-router logits, the gathered input and 3
    intermediates of each of its `top_k` experts, the shared expert's 3 intermediates."""
    s = shape
    tokens = seq_len + (new_tokens if regime == "decode" else 0)
    kv = estimate_kv_bytes(s, batch * tokens, dtype_bytes)
    ffn = 3 * s.intermediate if s.dense_layers else 0
    if s.sparse_layers:
        ffn = max(ffn, s.experts + s.top_k * (s.hidden + 3 * s.expert_intermediate) + 3 * s.shared_intermediate)
    act = batch * seq_len * (4 * s.hidden + ffn + 2 * (s.heads + 2 * s.kv_heads) * s.head_dim) * dtype_bytes
    scores = batch * s.heads * seq_len * tokens * dtype_bytes
    logits = batch * s.vocab * 4
    return kv + act + scores + logits


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU), so that a host clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peaks(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> tuple[float, float]:
    """Achievable (flops/s, bytes/s) on this device: best of repeated large matmuls and copies."""
    n = 4096 if device.type == "cuda" else 1024
    numel = (1 << 28 if device.type == "cuda" else 1 << 24)
    a = torch.randn(n, n, device=device).to(dtype)
    x = torch.empty(numel, device=device, dtype=dtype)
    y = torch.empty_like(x)

    def best(fn):
        fn()
        synchronize(device)
        out, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            out = min(out, time.perf_counter() - t0)
        return out

    flops = 2 * n ** 3 / best(lambda: a @ a)
    bandwidth = 2 * x.numel() * x.element_size() / best(lambda: y.copy_(x))
    return flops, bandwidth

"""Speed and KV-cache memory of MindSkip beside the oracle and an analytic bound (issue #6).

    python -m rt_lib.profiling --preset quick --model smollm2-135m-instruct \\
        --routers <router dir> --out results/runs/<id>

What is measured, per regime and grid point, for each variant:
- `prefill`: one forward of a `batch_size x seq_len` prompt into a fresh `DynamicCache`
  (`logits_to_keep=1`, as `generate` does); `median_ms` is per forward.
- `decode`: a `batch_size x seq_len` context is prefilled (not timed), then `new_tokens`
  single-token steps are timed with that cache (model forward directly, not `generate`,
  so sampling and stopping logic add no noise); `median_ms` is per generated token.
- `kv_bytes`: bytes of keys + values held by the cache after the prefill (prefill rows) or
  after the last generated token (decode rows). A layer never updated holds none.
- `skip_ratio`: realised fraction of routed attention executions skipped during the timed
  call (`ms.reset_stats()` / `ms.skip_ratio()`); for the variants with layers physically
  removed it is `removed / len(routed_layers)`, so every variant sits on the same axis.
- `bound_speedup`: the analytic oracle speedup for the sublayers the variant's decisions skip
  (`skip_ratio * len(routed_layers)` of what the routers gate: attention, MLP or whole layers;
  attention for `static_drop`); for `mask` that is what skipping them for real could reach,
  not what computing them all can.
Prompts are consecutive windows of a text (the CLI tokenizes `wikipedia-en`), so the routers
decide on the kind of input they were tuned on; decode feeds the text's next tokens.

Variants, all on the same weights (one MindSkip-wrapped model; for the plain variants its
gates are taken out and put back around each call, outside the timed region):
- `dense`: the base model.
- `mindskip_forced`: MindSkip with `ms.force`: the chosen `skip_layers` skipped, every other
  routed layer kept. Gives the clean comparison with the oracle.
- `mindskip`: MindSkip with its routers at the threshold (decisions may differ per sequence).
- `oracle`: the base model with the attention of `skip_layers` removed (`drop_sublayers`):
  the best any skipping of those layers can do.
- `mask`: MindSkip computing every routed sublayer then multiplying by the forced decision
  (`ms.set_execution("mask")`), the authors' 2026 behaviour: the lower reference (~1.0x).
- `static_drop`: the base model with the attention of `static_layers` removed for all inputs.

Protocol: warm-up calls, then `repeats` rounds in which the variants run interleaved, in
alternating order (A B C, C B A, ...) so that linear machine drift cancels; median, p10 and
p90 over rounds; `speedup` = dense median / variant median from the same run. On CUDA the
timed region is bracketed by CUDA events after a synchronize; on CPU wall-clock
`perf_counter` with a fixed `torch.set_num_threads` (recorded in profile.json).

The analytic bound (`bound_speedup`) is a per-operation roofline: each attention sublayer,
MLP sublayer and the LM head costs `max(flops / peak_flops, bytes / bandwidth)`;
`bound = dense time / time without the removed attention sublayers`. Peaks are measured on
the device at the start of a run (large matmul; large copy) unless given. It ignores
per-kernel launch and Python overhead, which removing a sublayer also saves, so on a small
model measured speedups can exceed it.

A grid point whose estimated memory exceeds what is available, or that raises an
out-of-memory error, is written with `status=skipped` and the reason; the rest continues.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import logging
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

REGIMES = ("prefill", "decode")
VARIANTS = ("dense", "mindskip_forced", "mindskip", "oracle", "mask", "static_drop")
COLUMNS = [
    "regime", "variant", "batch_size", "seq_len", "new_tokens", "median_ms", "p10_ms", "p90_ms",
    "tokens_per_s", "skip_ratio", "kv_bytes", "speedup", "bound_speedup", "status", "reason",
]  # docs/results_format.md, profile.csv


# --------------------------------------------------------------------------- settings

@dataclass
class ProfileSettings:
    prefill_batch_sizes: list[int] = field(default_factory=lambda: [1, 4])  # prefill grid
    prefill_seq_lens: list[int] = field(default_factory=lambda: [128])       # prompt lengths
    decode_batch_sizes: list[int] = field(default_factory=lambda: [1, 4])    # decode grid
    decode_context_lens: list[int] = field(default_factory=lambda: [128])    # prefilled context
    new_tokens: int = 16             # timed single-token steps per decode measurement
    regimes: list[str] = field(default_factory=lambda: list(REGIMES))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    skip_layers: list[int] | None = None  # forced/oracle/mask set; None: choose skip_k layers
    skip_k: int | None = 8           # None: the layers the routers skip on a calibration batch
    static_layers: list[int] | None = None  # static_drop set; None: rt_lib.baselines, else omitted
    threshold: float | None = None   # router threshold for `mindskip`; None: the checkpoint's
    warmup: int = 1                  # untimed rounds of every variant per grid point
    repeats: int = 5                 # timed interleaved rounds per grid point
    threads: int | None = None       # CPU: torch.set_num_threads; None: all usable cores
    seed: int = 0                    # seeds random prompts (no text given); offsets the text windows
    peak_flops: float | None = None  # roofline; None: measured at start
    bandwidth: float | None = None   # bytes/s; None: measured at start
    memory_headroom: float = 0.9     # a point runs only if its estimate < headroom * available


PRESETS = {
    # tiny random models in tests: seconds
    "smoke": ProfileSettings(prefill_batch_sizes=[1, 2], prefill_seq_lens=[8],
                             decode_batch_sizes=[1, 2], decode_context_lens=[8], new_tokens=3,
                             skip_k=2, warmup=1, repeats=2),
    # embedded SmolLM2-135M on a 2-core CPU: a few minutes. One thread: speedups are ratios
    # and barely depend on it, while two threads on a 2-core machine shared with other jobs
    # spin against them (a 1x128 forward measured 20x slower than with one thread)
    "quick": ProfileSettings(threads=1),
    # the whole grid, meant for a GPU; points that do not fit are reported as skipped
    "full": ProfileSettings(prefill_batch_sizes=[1, 4, 16, 64], prefill_seq_lens=[128, 512, 2048, 8192],
                            decode_batch_sizes=[1, 8, 32, 128], decode_context_lens=[512, 2048, 8192],
                            new_tokens=64, warmup=3, repeats=10, skip_k=8),
}


def preset(name: str, **overrides) -> ProfileSettings:
    return replace(copy.deepcopy(PRESETS[name]), **overrides)


# --------------------------------------------------------------------------- analytic bound

@dataclass
class Shape:
    """The sizes of a Llama-family decoder that set its cost."""
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "Shape":
        heads = config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )


def step_costs(shape: Shape, batch: int, new: int, past: int, dtype_bytes: int, head_tokens: int | None = None):
    """(flops, bytes) of one attention sublayer, one MLP sublayer and the LM head for one forward
    of `new` tokens per sequence on top of `past` cached ones. A multiply-add is 2 flops.

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
    return {"attn": (attn_flops, attn_bytes), "mlp": (mlp_flops, mlp_bytes), "head": (head_flops, head_bytes)}


def _roofline(cost, peak_flops, bandwidth):
    flops, nbytes = cost
    return max(flops / peak_flops, nbytes / bandwidth)


def regime_time(shape: Shape, regime: str, batch: int, seq_len: int, removed: float,
                peak_flops: float, bandwidth: float, dtype_bytes: int, new_tokens: int = 1,
                granularity: str = "attn") -> float:
    """Roofline seconds of one prefill forward, or per generated token in decode (averaged over
    `new_tokens` steps from a context of `seq_len`), with `removed` sublayers of `granularity`
    gone (attn: attention sublayers, mlp: MLP sublayers, block: whole layers)."""
    if granularity not in ("attn", "mlp", "block"):
        raise ValueError(f"granularity must be attn, mlp or block, got {granularity!r}")
    no_attn = removed if granularity in ("attn", "block") else 0.0
    no_mlp = removed if granularity in ("mlp", "block") else 0.0
    if regime == "prefill":
        steps = [step_costs(shape, batch, seq_len, 0, dtype_bytes, head_tokens=1)]
    elif regime == "decode":
        steps = [step_costs(shape, batch, 1, seq_len + i, dtype_bytes) for i in range(max(new_tokens, 1))]
    else:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    total = 0.0
    for c in steps:
        t_attn = _roofline(c["attn"], peak_flops, bandwidth)
        t_mlp = _roofline(c["mlp"], peak_flops, bandwidth)
        total += (shape.num_layers - no_attn) * t_attn + (shape.num_layers - no_mlp) * t_mlp
        total += _roofline(c["head"], peak_flops, bandwidth)
    return total / len(steps)


def bound_speedup(shape: Shape, regime: str, batch: int, seq_len: int, removed: float,
                  peak_flops: float, bandwidth: float, dtype_bytes: int, new_tokens: int = 1,
                  granularity: str = "attn") -> float:
    """Predicted oracle speedup: dense roofline time / time without `removed` sublayers of
    `granularity` (fractional: a sublayer skipped for half of the rows counts 0.5)."""
    args = (peak_flops, bandwidth, dtype_bytes, new_tokens, granularity)
    dense = regime_time(shape, regime, batch, seq_len, 0, *args)
    return dense / regime_time(shape, regime, batch, seq_len, removed, *args)


def measure_peaks(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> tuple[float, float]:
    """Achievable (flops/s, bytes/s) on this device: best of repeated large matmuls and copies."""
    n = 4096 if device.type == "cuda" else 1024
    numel = (1 << 28 if device.type == "cuda" else 1 << 24)
    a = torch.randn(n, n, device=device).to(dtype)
    x = torch.empty(numel, device=device, dtype=dtype)
    y = torch.empty_like(x)

    def best(fn):
        fn()
        _sync(device)
        out, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            out = min(out, time.perf_counter() - t0)
        return out

    flops = 2 * n ** 3 / best(lambda: a @ a)
    bandwidth = 2 * x.numel() * x.element_size() / best(lambda: y.copy_(x))
    return flops, bandwidth


# --------------------------------------------------------------------------- measurement

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of `fn`: CUDA events on GPU, perf_counter on CPU."""
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleave(names: list[str], run_once: Callable[[str], dict], warmup: int, repeats: int) -> dict[str, list[dict]]:
    """Warm up every variant, then `repeats` rounds A B C, C B A, ...: each round runs every
    variant once; alternating the order cancels drift that is linear in time."""
    for _ in range(warmup):
        for name in names:
            run_once(name)
    out = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(run_once(name))
    return out


def kv_cache_bytes(cache) -> int:
    """Bytes of keys and values held by a transformers Cache (a layer never updated holds none)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the device (CUDA: mem_get_info; CPU: MemAvailable), None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_point_bytes(shape: Shape, regime: str, batch: int, seq_len: int, new_tokens: int, dtype_bytes: int) -> int:
    """Upper estimate of what one grid point allocates beyond the weights: the dense KV cache,
    one layer's activations, a fully materialised score matrix and the last-token logits."""
    s = shape
    tokens = seq_len + (new_tokens if regime == "decode" else 0)
    kv = batch * tokens * 2 * s.kv_heads * s.head_dim * s.num_layers * dtype_bytes
    act = batch * seq_len * (4 * s.hidden + 3 * s.intermediate + 2 * (s.heads + 2 * s.kv_heads) * s.head_dim) * dtype_bytes
    scores = batch * s.heads * seq_len * tokens * dtype_bytes
    logits = batch * s.vocab * 4
    return kv + act + scores + logits


def _forward_kwargs(model) -> str:
    # transformers 5.x names the cache argument `cache` (`past_key_values` is deprecated);
    # older releases only know `past_key_values`. The one place that knows.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _step(model, ids, cache, start: int, logits_to_keep: int = 1):
    # explicit positions: the cache's own length is read from layer 0, which a removed or
    # skipped layer 0 would leave empty
    pos = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    return model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=logits_to_keep,
                 **{_forward_kwargs(model): cache})


# --------------------------------------------------------------------------- variants

@dataclass
class Variant:
    name: str
    model: torch.nn.Module          # the HF model to call while active
    enter: Callable[[], object]     # put `model` in this variant's state
    exit: Callable[[], None]
    skip_ratio: Callable[[], float]  # realised skip ratio of the last timed call
    reset: Callable[[], None] = lambda: None  # clears skip statistics before a timed call

    @contextlib.contextmanager
    def active(self):
        self.enter()
        try:
            yield self.model
        finally:
            self.exit()


def build_variants(ms, names, skip_layers, static_layers=None, threshold=None) -> list[Variant]:
    """The profiled variants, all on the weights of one MindSkip model `ms` (so that no variant
    runs on a differently allocated copy). `skip_layers` (routed layers) are skipped by
    mindskip_forced and mask and removed by the oracle."""
    from rt_lib.mindskip import drop_sublayers

    routed = list(ms.routed_layers)
    bad = sorted(set(skip_layers) - set(routed))
    if bad:
        raise ValueError(f"skip_layers {bad} are not routed layers {routed}")
    forced = {layer: layer not in skip_layers for layer in routed}
    n_routed = len(routed)
    stack = {}

    def ms_state(force, execution):
        def enter():
            ms.set_execution(execution)
            ms.force(force)
        return enter

    def ms_exit():
        ms.force(None)
        ms.set_execution("skip")

    def plain(key, drop=(), granularity="attn"):
        def enter():
            st = stack[key] = contextlib.ExitStack()
            st.enter_context(ms.detached())  # same weights, plain base model
            if drop:
                st.callback(drop_sublayers(ms.model, list(drop), granularity=granularity).restore)

        def exit():
            stack.pop(key).close()
        return enter, exit

    if threshold is not None:
        ms.set_threshold(threshold)
    ms_ratio = lambda: float(ms.skip_ratio())  # noqa: E731
    out = []
    for name in names:
        if name == "dense":
            out.append(Variant(name, ms.model, *plain(name), lambda: 0.0))
        elif name == "mindskip_forced":
            out.append(Variant(name, ms.model, ms_state(forced, "skip"), ms_exit, ms_ratio, ms.reset_stats))
        elif name == "mindskip":
            out.append(Variant(name, ms.model, ms_state(None, "skip"), ms_exit, ms_ratio, ms.reset_stats))
        elif name == "mask":
            out.append(Variant(name, ms.model, ms_state(forced, "mask"), ms_exit, ms_ratio, ms.reset_stats))
        elif name == "oracle":
            k = len(skip_layers)
            # the oracle removes what the routers gate: attention, MLP or whole layers
            out.append(Variant(name, ms.model, *plain(name, skip_layers, ms.config.granularity),
                               lambda k=k: k / n_routed))
        elif name == "static_drop":
            if not static_layers:
                log.warning("static_drop: no layer list (static_layers) and none from rt_lib.baselines; omitted")
                continue
            k = len(static_layers)
            out.append(Variant(name, ms.model, *plain(name, static_layers), lambda k=k: k / n_routed))
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return out


def choose_skip_layers(ms, input_ids: torch.Tensor, k: int | None) -> list[int]:
    """The routed layers to force-skip and remove in the oracle. With `k`: the k layers the
    routers skip most often on `input_ids` (ties: deeper first). Without: every layer the
    routers skip for all sequences of `input_ids`."""
    ms.force(None)
    ms.set_execution("skip")
    ms.reset_stats()
    with torch.inference_mode():
        ms.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    executed = {int(layer): float(v) for layer, v in ms.skip_stats().items()}
    ms.reset_stats()
    if k is None:
        return sorted(layer for layer, v in executed.items() if v == 0.0)
    ranked = sorted(ms.routed_layers, key=lambda layer: (executed.get(layer, 1.0), -layer))
    return sorted(ranked[:k])


def _percentile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def grid_tokens(batch: int, length: int, vocab: int, seed: int = 0, tokens: torch.Tensor | None = None):
    """(batch, length) token ids: consecutive non-overlapping windows of the 1-D `tokens` (text,
    so that routers see what they were tuned on; wrapping around), else seeded random ids."""
    if tokens is None:
        g = torch.Generator().manual_seed(seed + 7919 * batch + length)
        return torch.randint(0, vocab, (batch, length), generator=g)
    n = tokens.numel()
    stride = length if batch * length <= n else max(n // batch, 1)
    idx = (torch.arange(batch)[:, None] * stride + torch.arange(length)[None, :] + seed) % n
    return tokens.reshape(-1)[idx]


def _measure_point(variants, regime, batch, seq_len, settings, device, vocab, tokens=None):
    ids = grid_tokens(batch, seq_len + settings.new_tokens, vocab, settings.seed, tokens).to(device)
    prompt, steps = ids[:, :seq_len], ids[:, seq_len:]  # decode feeds the text's next tokens
    by_name = {v.name: v for v in variants}

    def run_once(name):
        v = by_name[name]
        with v.active(), torch.inference_mode():
            cache = _new_cache(v.model)
            if regime == "prefill":
                v.reset()
                ms_ = timed_ms(lambda: _step(v.model, prompt, cache, 0), device)
                ratio, kv, kv_prefill = v.skip_ratio(), kv_cache_bytes(cache), None
            else:
                _step(v.model, prompt, cache, 0)
                kv_prefill = kv_cache_bytes(cache)
                v.reset()

                def decode():
                    for i in range(settings.new_tokens):
                        _step(v.model, steps[:, i:i + 1], cache, seq_len + i)
                ms_ = timed_ms(decode, device) / settings.new_tokens
                ratio, kv = v.skip_ratio(), kv_cache_bytes(cache)
            del cache
        return {"ms": ms_, "skip_ratio": ratio, "kv_bytes": kv, "kv_bytes_prefill": kv_prefill}

    return interleave([v.name for v in variants], run_once, settings.warmup, settings.repeats)


def profile(ms, settings: ProfileSettings, tokens: torch.Tensor | None = None, progress: bool = True):
    """Measure every variant over the settings' grid. `ms`: a MindSkipModel (see `prepare_models`);
    `tokens`: a 1-D tensor of token ids the prompts are cut from (None: random ids; speed does
    not depend on the text, but router decisions do).
    Returns (rows: list of dicts with COLUMNS, conditions: dict for profile.json)."""
    from tqdm.auto import tqdm

    model = ms.model
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    dtype_bytes = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    shape = Shape.from_config(model.config)
    if device.type == "cpu":
        torch.set_num_threads(settings.threads or len(os.sched_getaffinity(0)))
    threads = torch.get_num_threads()
    load_before = list(os.getloadavg())
    if device.type == "cpu" and load_before[0] > len(os.sched_getaffinity(0)):
        log.warning("load average %.1f on %d usable cores with %d threads: timings will be noisy",
                    load_before[0], len(os.sched_getaffinity(0)), threads)
    ms.eval()

    skip_layers = settings.skip_layers
    if skip_layers is None:
        calib = grid_tokens(max(settings.prefill_batch_sizes), max(settings.prefill_seq_lens), shape.vocab,
                            settings.seed, tokens).to(device)
        skip_layers = choose_skip_layers(ms, calib, settings.skip_k)
    static_layers = settings.static_layers
    if static_layers is None and "static_drop" in settings.variants:
        static_layers = _baseline_static_layers(ms, len(skip_layers))
    variants = build_variants(ms, settings.variants, skip_layers, static_layers, settings.threshold)

    peak_flops, bandwidth = settings.peak_flops, settings.bandwidth
    if peak_flops is None or bandwidth is None:
        measured = measure_peaks(device, dtype)
        peak_flops, bandwidth = peak_flops or measured[0], bandwidth or measured[1]

    points = [("prefill", b, s) for b in settings.prefill_batch_sizes for s in settings.prefill_seq_lens]
    points += [("decode", b, s) for b in settings.decode_batch_sizes for s in settings.decode_context_lens]
    points = [p for p in points if p[0] in settings.regimes]
    rows, raw = [], []
    for regime, batch, seq_len in tqdm(points, desc="profile", disable=not progress):
        new = settings.new_tokens if regime == "decode" else 0
        base_row = dict(regime=regime, batch_size=batch, seq_len=seq_len, new_tokens=new)
        need = estimate_point_bytes(shape, regime, batch, seq_len, new, dtype_bytes)
        free = available_memory(device)
        reason = None
        if free is not None and need > settings.memory_headroom * free:
            reason = f"estimated {need / 2**30:.2f} GiB > {settings.memory_headroom:.0%} of {free / 2**30:.2f} GiB available"
        else:
            try:
                results = _measure_point(variants, regime, batch, seq_len, settings, device, shape.vocab, tokens)
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_oom(exc):
                    raise
                reason = "out of memory: " + str(exc).strip().splitlines()[0][:200]
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if reason is not None:
            log.warning("%s batch=%d seq_len=%d skipped: %s", regime, batch, seq_len, reason)
            rows += [dict(base_row, variant=v.name, status="skipped", reason=reason) for v in variants]
            continue
        dense_ms = None
        point_rows = []
        for v in variants:
            rs = results[v.name]
            times = [r["ms"] for r in rs]
            med = _percentile(times, 50)
            ratio = sum(r["skip_ratio"] for r in rs) / len(rs)
            n_tokens = batch * (seq_len if regime == "prefill" else 1)
            # the bound for the sublayers this variant's decisions skip (for `mask`: what skipping
            # them for real could reach); static drop removes attention whatever the routers gate
            kind = "attn" if v.name == "static_drop" else ms.config.granularity
            bound = bound_speedup(shape, regime, batch, seq_len, ratio * len(ms.routed_layers), peak_flops,
                                  bandwidth, dtype_bytes, max(new, 1), granularity=kind)
            point_rows.append(dict(base_row, variant=v.name, median_ms=med, p10_ms=_percentile(times, 10),
                                   p90_ms=_percentile(times, 90), tokens_per_s=n_tokens * 1e3 / med,
                                   skip_ratio=ratio, kv_bytes=rs[-1]["kv_bytes"], bound_speedup=bound,
                                   status="ok", reason=""))
            raw.append(dict(base_row, variant=v.name, times_ms=times, kv_bytes_prefill=rs[-1]["kv_bytes_prefill"],
                            kv_bytes=rs[-1]["kv_bytes"]))
            if v.name == "dense":
                dense_ms = med
        for r in point_rows:
            r["speedup"] = dense_ms / r["median_ms"] if dense_ms else float("nan")
        rows += point_rows

    rows = [{c: r.get(c, "" if c in ("reason",) else float("nan")) for c in COLUMNS} for r in rows]
    conditions = {
        "device_name": _device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": threads,
        "load_average": [load_before, list(os.getloadavg())],  # 1/5/15-min, before and after
        "timing": "cuda events after synchronize" if device.type == "cuda" else "time.perf_counter wall clock",
        "interleaving": "warm-up rounds, then rounds of all variants in alternating order (ABC CBA ...)",
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "routed_layers": list(ms.routed_layers),
        "skip_layers": list(skip_layers),
        "static_layers": list(static_layers) if static_layers else None,
        "prompts": "random token ids" if tokens is None else f"windows of {tokens.numel()} given text tokens",
        "threshold": ms.config.threshold,  # in effect for the `mindskip` variant
        "roofline": {"peak_flops": peak_flops, "bandwidth_bytes_per_s": bandwidth, "dtype_bytes": dtype_bytes,
                     "measured": settings.peak_flops is None or settings.bandwidth is None},
        "bound_curves": _bound_curves(shape, points, len(ms.routed_layers), peak_flops, bandwidth, dtype_bytes,
                                      settings.new_tokens, ms.config.granularity),
        "granularity": ms.config.granularity,
        "settings": asdict(settings),
        **_provenance(),
        "measurements": raw,
    }
    return rows, conditions


def _bound_curves(shape, points, n_routed, peak_flops, bandwidth, dtype_bytes, new_tokens, granularity="attn"):
    """The bound at every number of removed routed sublayers, per grid point (plots)."""
    out = []
    for regime, batch, seq_len in points:
        n = max(new_tokens, 1) if regime == "decode" else 1
        out.append({"regime": regime, "batch_size": batch, "seq_len": seq_len,
                    "skip_ratio": [k / n_routed for k in range(n_routed + 1)],
                    "bound_speedup": [bound_speedup(shape, regime, batch, seq_len, k, peak_flops, bandwidth,
                                                    dtype_bytes, n, granularity) for k in range(n_routed + 1)]})
    return out


def _baseline_static_layers(ms, k):
    """The static attention drop's own choice of k layers (rt_lib.baselines: 1 - cos importance
    on calibration text); None, and the variant is omitted, when it cannot be had."""
    try:
        from rt_lib.baselines import static_drop_layers
    except ImportError:
        return None
    try:
        with ms.detached():
            return list(static_drop_layers(ms.model, k))
    except Exception as exc:  # noqa: BLE001 - an optional comparison must not stop the profile
        log.warning("static_drop: rt_lib.baselines could not choose layers (%s: %s)", type(exc).__name__, exc)
        return None


def _device_name(device):
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def _provenance():
    """Versions, git revision and device from rt_lib.runs (the run.json fields)."""
    from rt_lib.runs import provenance

    prov = provenance()
    prov.pop("threads", None)  # the profiler's own, set above, is the one that applies
    return prov


def prepare_models(model, routers: str | None = None, config=None):
    """`model` wrapped with MindSkip in place: routers from a checkpoint folder, or fresh
    (zero-init) ones from `config`. Every variant of `profile` runs on these same weights."""
    from rt_lib.config import MindSkipConfig
    from rt_lib.mindskip import MindSkipModel, get_mindskip_model

    if routers:
        ms = MindSkipModel.from_pretrained(model, routers)
    else:
        ms = get_mindskip_model(model, config or MindSkipConfig())
    ms.eval()
    return ms


# --------------------------------------------------------------------------- results

def summarize(rows) -> "pd.DataFrame":  # noqa: F821
    """One line per grid point: MindSkip (forced) as a fraction of the oracle's speedup, the
    mask variant's speedup, the measured KV saving, and the bound beside each."""
    import pandas as pd

    df = pd.DataFrame(rows)
    ok = df[df.status == "ok"]
    out = []
    for (regime, b, s), g in ok.groupby(["regime", "batch_size", "seq_len"], sort=False):
        v = g.set_index("variant")

        def get(name, col):
            return v.at[name, col] if name in v.index else float("nan")
        line = {"regime": regime, "batch_size": b, "seq_len": s, "dense_ms": get("dense", "median_ms")}
        for name in ("mindskip_forced", "oracle", "mindskip", "mask", "static_drop"):
            if name in v.index:
                line[f"{name}_speedup"] = get(name, "speedup")
        line["forced/oracle"] = get("mindskip_forced", "speedup") / get("oracle", "speedup")
        line["skip_ratio_forced"] = get("mindskip_forced", "skip_ratio")
        line["kv_saving"] = 1 - get("mindskip_forced", "kv_bytes") / get("dense", "kv_bytes")
        line["bound_oracle"] = get("oracle", "bound_speedup")
        out.append(line)
    return pd.DataFrame(out)


def plot_speedup(rows, conditions, path_stem):
    """speedup vs skip ratio per regime: measured variants, bound curves. PNG + PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(rows)
    ok = df[df.status == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    markers = {"dense": "o", "mindskip_forced": "s", "mindskip": "D", "oracle": "*", "mask": "x", "static_drop": "^"}
    for ax, regime in zip(axes, REGIMES):
        sub = ok[ok.regime == regime]
        for curve in conditions.get("bound_curves", []):
            if curve["regime"] == regime:
                ax.plot(curve["skip_ratio"], curve["bound_speedup"], lw=1, alpha=0.6,
                        label=f"bound b={curve['batch_size']} n={curve['seq_len']}")
        for name, g in sub.groupby("variant", sort=False):
            ax.scatter(g.skip_ratio, g.speedup, marker=markers.get(name, "o"), label=name, s=40)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(regime)
        ax.set_xlabel("skip ratio (routed attention sublayers)")
    axes[0].set_ylabel("speedup vs dense (same run)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{conditions.get('device', '')} {conditions.get('dtype', '')} threads={conditions.get('threads')}")
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(f"{path_stem}.{ext}")
    plt.close(fig)


def write_results(rows, conditions, out_dir):
    """<out_dir>/profile/{profile.csv, profile.json, speedup_vs_skip.png/.pdf}; returns the folder."""
    import pandas as pd

    from rt_lib.runs import atomic_write_json, write_csv

    prof = Path(out_dir) / "profile"
    prof.mkdir(parents=True, exist_ok=True)
    write_csv(prof / "profile.csv", rows, COLUMNS)
    atomic_write_json(prof / "profile.json", conditions)
    try:
        from rt_lib.plots import plot_speedup_vs_skip, save_figure
    except ImportError:  # the kit's figure module is optional here: draw the plain plot
        plot_speedup(rows, conditions, prof / "speedup_vs_skip")
    else:
        import matplotlib.pyplot as plt

        fig = plot_speedup_vs_skip(pd.DataFrame(rows, columns=COLUMNS),
                                   title=f"{conditions.get('device')} {conditions.get('dtype')} "
                                         f"threads={conditions.get('threads')}")
        save_figure(fig, prof / "speedup_vs_skip")
        plt.close(fig)
    return prof


# --------------------------------------------------------------------------- CLI

def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()] if text else None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rt_lib.profiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--routers", default=None, help="router checkpoint folder; default: fresh (zero-init) routers")
    p.add_argument("--out", required=True, help="run folder; results go to <out>/profile/")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16; default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    p.add_argument("--skip-layers", type=_ints, default=None, help="comma list of routed layers to force-skip/remove")
    p.add_argument("--skip-k", type=int, default=None, help="number of layers to force-skip (chosen by the routers)")
    p.add_argument("--static-layers", type=_ints, default=None, help="comma list for static_drop")
    p.add_argument("--variants", default=None, help=f"comma list from {','.join(VARIANTS)}")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--num-routed-layers", type=int, default=None,
                   help="fresh routers only: route the n deepest layers except the last (default 16)")
    p.add_argument("--text", default="wikipedia-en",
                   help="data set (rt_lib.assets.load_dataset, column `text`) the prompts are cut from; "
                        "'none': random token ids")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    overrides = {k: v for k, v in dict(skip_layers=a.skip_layers, skip_k=a.skip_k, static_layers=a.static_layers,
                                       threshold=a.threshold, repeats=a.repeats, warmup=a.warmup,
                                       threads=a.threads).items() if v is not None}
    if a.variants:
        overrides["variants"] = a.variants.split(",")
    settings = preset(a.preset, **overrides)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    import pandas as pd

    from rt_lib.assets import load_model
    from rt_lib.config import MindSkipConfig

    model, tokenizer = load_model(a.model, dtype=dtype, device=device, attn_implementation="sdpa")
    fresh = MindSkipConfig(**({"num_routed_layers": a.num_routed_layers} if a.num_routed_layers else {}))
    rows, _, prof = run_step(model, tokenizer, a.out, settings, routers=a.routers, config=fresh,
                             text=None if a.text.lower() == "none" else a.text, preset_name=a.preset,
                             model_name=a.model, progress=not a.no_progress)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        print(pd.DataFrame(rows)[["regime", "variant", "batch_size", "seq_len", "median_ms", "p10_ms", "p90_ms",
                                  "skip_ratio", "kv_bytes", "speedup", "bound_speedup", "status"]].to_string(index=False))
        print()
        print(summarize(rows).to_string(index=False))
    print(f"\nwrote {prof}")
    return 0


def run_step(model, tokenizer, out, settings: ProfileSettings, routers: str | None = None, config=None,
             text: str | None = "wikipedia-en", preset_name: str | None = None, model_name: str | None = None,
             progress: bool = True):
    """The whole profiling step of a run (CLI and notebook): wrap `model` with the routers (a
    checkpoint folder) or fresh ones (`config`), cut prompts from `text` (None: random ids),
    profile, write `<out>/profile/` and record the step in `<out>/run.json` (created if
    missing). Returns (rows, conditions, profile folder)."""
    from rt_lib.runs import new_run, update_run

    out = Path(out).resolve()
    if not (out / "run.json").exists():
        new_run(root=out.parent, run_id=out.name, preset=preset_name)
    tokens = text_tokens(tokenizer, text) if text else None
    ms = prepare_models(model, routers, config)
    t0 = time.perf_counter()
    rows, conditions = profile(ms, settings, tokens, progress=progress)
    conditions["wall_time_s"] = round(time.perf_counter() - t0, 1)
    model_name = model_name or getattr(model.config, "rt_kit_name", None) or model.config.name_or_path
    conditions.update(preset=preset_name, model=model_name, routers=router_record(routers), text=text)
    prof = write_results(rows, conditions, out)
    update_run(out, "profile", {"preset": preset_name, "model": model_name, "routers": conditions["routers"],
                                "skip_layers": conditions["skip_layers"], "settings": conditions["settings"],
                                "files": ["profile/profile.csv", "profile/profile.json"]})
    return rows, conditions, prof


def text_tokens(tokenizer, name: str, split: str = "validation", max_chars: int = 400_000) -> torch.Tensor:
    """Token ids of the start of a text data set, as one 1-D tensor (prompts are cut from it)."""
    from rt_lib.assets import load_dataset

    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids, n = [], 0
    for t in load_dataset(name, split=split)["text"]:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + sep
        n += len(t)
        if n >= max_chars:
            break
    return torch.tensor(ids, dtype=torch.long)


def router_record(path):
    """Path, weights sha256 and config of a router checkpoint, for profile.json (None: fresh)."""
    if not path:
        return None
    from rt_lib.mindskip import read_checkpoint_metadata

    meta = read_checkpoint_metadata(path)
    return {"path": str(path), "weights_sha256": meta.get("weights_sha256"), "config": meta.get("config")}


if __name__ == "__main__":
    sys.exit(main())

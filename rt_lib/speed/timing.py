"""Timing primitives of the profiler: one timed call, interleaved rounds, forward steps into a
KV cache, the prompts of a grid point, and the measurement of one grid point.

The timing loop is hand-written on purpose: which variants run in which order, and what is
inside the timed region, are the measurement. On CUDA the timed region is bracketed by CUDA
events after a synchronize; on CPU it is wall-clock `perf_counter`.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rt_lib.speed.roofline import synchronize

if TYPE_CHECKING:
    from rt_lib.speed.variants import Variant


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of `fn`: CUDA events on GPU, perf_counter on CPU."""
    synchronize(device)
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


def cache_argument(model) -> str:
    # transformers 5.x names the cache argument `cache` (`past_key_values` is deprecated);
    # older releases only know `past_key_values`. The one place that knows.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model):
    """An empty `DynamicCache` for `model` (one per prefill)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def forward_step(model, ids, cache, start: int, logits_to_keep: int = 1):
    """One forward of `ids` (batch, new tokens) at positions `start...` into `cache`."""
    # explicit positions: the cache's own length is read from layer 0, which a removed or
    # skipped layer 0 would leave empty
    pos = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    return model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=logits_to_keep,
                 **{cache_argument(model): cache})


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


@contextlib.contextmanager
def untimed_threads(device: torch.device, threads: int | None = None):
    """``threads`` CPU threads (None: every usable core) for an untimed call (a decode context's
    prefill), then back to the timing's thread count: long contexts prefill in a fraction of the
    time, and no timed call runs with a different count."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prefill(model, prompt: torch.Tensor, device: torch.device, threads: int | None = None):
    """A new cache holding `prompt` (untimed; on `threads` CPU threads, None: every usable core)."""
    cache = new_cache(model)
    with untimed_threads(device, threads):
        forward_step(model, prompt, cache, 0)
    return cache


def rewind(cache, length: int) -> None:
    """Cut every filled layer of `cache` back to its first `length` positions (undo decode steps)."""
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() >= 2 and keys.shape[-2] > length:
            layer.keys = keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def measure_point(variants: list[Variant], regime: str, batch: int, seq_len: int, settings,
                  device: torch.device, vocab: int, tokens: torch.Tensor | None = None) -> dict[str, list[dict]]:
    """Time every variant at one grid point, interleaved. Returns, per variant name, one dict
    per timed round: `time_ms` (per forward, or per generated token in decode), `skip_ratio`,
    `skipped` (per layer, the fraction of sublayer executions skipped), `kv_bytes` (after the
    timed call) and `kv_bytes_prefill` (decode: after the prefill). In decode, a variant's
    context is prefilled once and rewound after each round (`Variant.rewindable`), so long
    contexts cost one prefill per variant, not one per round. ``settings``: a
    ``rt_lib.speed.profiling.ProfileSettings``."""
    ids = grid_tokens(batch, seq_len + settings.new_tokens, vocab, settings.seed, tokens).to(device)
    prompt, steps = ids[:, :seq_len], ids[:, seq_len:]  # decode feeds the text's next tokens
    by_name = {v.name: v for v in variants}
    prefilled: dict[str, tuple] = {}

    def context(v):
        """A cache holding the prefilled prompt for variant `v` (and its KV bytes)."""
        if v.name in prefilled:
            cache, state, kv = prefilled[v.name]
            rewind(cache, seq_len)
            v.restore_state(state)
            return cache, kv
        cache = prefill(v.model, prompt, device, settings.prefill_threads)
        kv = kv_cache_bytes(cache)
        if v.rewindable:
            prefilled[v.name] = (cache, v.save_state(), kv)
        return cache, kv

    def run_once(name):
        v = by_name[name]
        with v.active(), torch.inference_mode():
            if regime == "prefill":
                cache = new_cache(v.model)
                v.reset()
                t_ms = timed_ms(lambda: forward_step(v.model, prompt, cache, 0), device)
                ratio, kv, kv_prefill = v.skip_ratio(), kv_cache_bytes(cache), None
            else:
                cache, kv_prefill = context(v)
                v.reset()

                def decode():
                    for i in range(settings.new_tokens):
                        forward_step(v.model, steps[:, i:i + 1], cache, seq_len + i)
                t_ms = timed_ms(decode, device) / settings.new_tokens
                ratio, kv = v.skip_ratio(), kv_cache_bytes(cache)
            skipped = v.skipped()
        return {"time_ms": t_ms, "skip_ratio": ratio, "skipped": skipped, "kv_bytes": kv,
                "kv_bytes_prefill": kv_prefill}

    try:
        return interleave([v.name for v in variants], run_once, settings.warmup, settings.repeats)
    finally:
        prefilled.clear()


def sublayer_ms(dense: Variant, regime: str, batch: int, seq_len: int, settings,
                device: torch.device, vocab: int, tokens: torch.Tensor | None = None,
                rounds: int = 2) -> tuple[float, dict[tuple[int, str], float]]:
    """The dense model's time at one grid point, in total and per sublayer: ``(total_ms,
    {(layer, kind): ms})`` with kind ``attn``, ``mlp`` (a dense MLP) or ``moe`` (the sparse MoE
    block in the MLP slot of an MoE layer: expert router, experts, any shared expert) and
    ``block`` (the whole layer), per forward (prefill) or per generated token (decode), averaged
    over `rounds` calls timed with forward hooks (the decode context is prefilled once, not
    recorded, and rewound per round). The kinds are the granularities that gate them, so a
    variant's skipped sublayers are looked up under its own granularity.
    ``settings``: a ``rt_lib.speed.profiling.ProfileSettings``.
    What removing a set of sublayers can at most save is the sum of their times;
    `measured_bound` turns that into a speedup bound."""
    from rt_lib.mindskip.architecture import find_decoder, get_slot
    from rt_lib.mindskip.moe import moe_layers

    ids = grid_tokens(batch, seq_len + settings.new_tokens, vocab, settings.seed, tokens).to(device)
    prompt, steps = ids[:, :seq_len], ids[:, seq_len:]
    acc: dict[tuple[int, str], float] = {}
    started: dict[tuple[int, str], float] = {}
    recording = [False]

    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def hooks_for(module, key):
        def pre(*_):
            if recording[0]:
                started[key] = now()

        def post(*_):
            if recording[0]:
                acc[key] = acc.get(key, 0.0) + (now() - started.pop(key)) * 1e3
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def timed(fn) -> float:
        recording[0] = True
        t0 = now()
        try:
            fn()
        finally:
            recording[0] = False
        return (now() - t0) * 1e3

    total, units = 0.0, 0
    with dense.active(), torch.inference_mode():
        _, layers = find_decoder(dense.model)
        sparse = set(moe_layers(layers))
        handles = [h for i in range(len(layers)) for kind in ("attn", "moe" if i in sparse else "mlp", "block")
                   for h in hooks_for(get_slot(layers, i, kind), (i, kind))]
        try:
            context = prefill(dense.model, prompt, device, settings.prefill_threads) if regime == "decode" else None
            for _ in range(rounds):
                if regime == "prefill":
                    cache = new_cache(dense.model)
                    total += timed(lambda: forward_step(dense.model, prompt, cache, 0))
                    units += 1
                    continue
                cache = context
                rewind(cache, seq_len)
                total += timed(lambda: [forward_step(dense.model, steps[:, i:i + 1], cache, seq_len + i)
                                        for i in range(settings.new_tokens)])
                units += settings.new_tokens
        finally:
            for h in handles:
                h.remove()
    return total / units, {k: v / units for k, v in acc.items()}


def measured_bound(total_ms: float, sublayers: dict[tuple[int, str], float], skipped: dict[int, float],
                   granularity: str) -> float:
    """Upper bound on a variant's speedup at a grid point: dense time / (dense time - the
    dense model's time in the sublayers the variant skips, weighted by the fraction of their
    executions it skips). Removing those sublayers saves at most their own time, so the oracle
    can approach this, not pass it (beyond timing noise)."""
    saved = sum(frac * sublayers.get((layer, granularity), 0.0) for layer, frac in skipped.items())
    return total_ms / (total_ms - saved) if total_ms > saved else float("inf")

"""Speed and KV-cache memory of MindSkip beside the oracle and an analytic bound.

    python -m rt_lib profile --grid quick --model smollm2-135m-instruct \\
        --routers <router dir> --out results/runs/<id>

What is measured, per regime and grid point, for each variant:
- `prefill`: one forward of a `batch_size x seq_len` prompt into a fresh `DynamicCache`
  (`logits_to_keep=1`, as `generate` does); `median_ms` is per forward.
- `decode`: a `batch_size x seq_len` context is prefilled (not timed), then `new_tokens`
  single-token steps are timed with that cache (model forward directly, not `generate`,
  so sampling and stopping logic add no noise); `median_ms` is per generated token.
- `kv_bytes`: bytes of keys + values held by the cache after the prefill (prefill rows) or
  after the last generated token (decode rows). A layer never updated holds none.
- `skip_ratio`: realised fraction of routed sublayer executions skipped during the timed call
  (`ms.reset_stats()` / `ms.skip_ratio()`), at the routers' granularity (attention, MLP, sparse
  MoE blocks or whole layers); for the variants with sublayers physically removed it is
  `removed / len(routed_layers)`, so every variant sits on the same axis.
- `bound_speedup`: an upper bound measured at the same grid point: the dense model is run with
  forward hooks timing every attention sublayer, MLP sublayer (on an MoE model: the sparse MoE
  block, expert router and experts together) and layer; bound = dense time /
  (dense time - the time of the sublayers the variant skips, each weighted by the fraction of
  its executions skipped). Removing sublayers saves at most their own time, so the oracle can
  approach the bound but not pass it beyond noise. For `mask` it is what skipping the masked
  sublayers for real could reach.
- `roofline_speedup`: the analytic roofline estimate for the same skipped sublayers
  (`rt_lib.speed.roofline`), a reading aid for GPU runs; not a bound (it ignores per-kernel and
  Python overhead, which removing a sublayer also saves).
Prompts are consecutive windows of a text (the CLI tokenizes `wikipedia-en`), so the routers
decide on the kind of input they were tuned on; decode feeds the text's next tokens.

Variants (`rt_lib.speed.variants`), all on the same weights (one MindSkip-wrapped model; for
the plain variants its gates are taken out and put back around each call, outside the timed
region):
- `dense`: the base model.
- `mindskip_forced`: MindSkip with `ms.force`: the chosen `skip_layers` skipped, every other
  routed layer kept. Gives the clean comparison with the oracle.
- `mindskip`: MindSkip with its routers at the threshold (decisions may differ per sequence).
- `oracle`: the base model with the routed sublayers of `skip_layers` (attention, MLP, sparse
  MoE blocks or whole layers, as the routers gate) removed (`drop_sublayers`; a removed MoE
  block leaves the residual unchanged): the best any skipping of those sublayers can do.
- `mask`: MindSkip computing every routed sublayer then multiplying by the forced decision
  (`ms.set_execution("mask")`), the authors' 2026 behaviour: the lower reference (~1.0x).
- `static_drop`: the base model with the attention of `static_layers` removed for all inputs.
  Omitted by default for `moe` routers (an attention drop is no comparison for skipping MoE
  blocks; given `static_layers` it runs) and wherever no layer list can be had; profile.json
  `omitted` says why.

Protocol: warm-up calls, then `repeats` rounds in which the variants run interleaved, in
alternating order (A B C, C B A, ...) so that linear machine drift cancels; median, p10 and
p90 over rounds; `speedup` = dense median / variant median from the same run. On CUDA the
timed region is bracketed by CUDA events after a synchronize; on CPU wall-clock
`perf_counter` with a fixed `torch.set_num_threads` (recorded in profile.json). The timing
loop is hand-written on purpose: the interleaving and what is inside the timed region are
the measurement.

The roofline estimate (`roofline_speedup`, `rt_lib.speed.roofline`) is per operation: each
attention sublayer, MLP sublayer, sparse MoE block (its expert router, `top_k` experts per
token, any shared expert; the weights of the experts the tokens touch) and the LM head costs
`max(flops / peak_flops, bytes / bandwidth)`; `bound = dense time / time without the removed
sublayers`. Peaks are measured on
the device at the start of a run (large matmul; large copy) unless given. It ignores
per-kernel launch and Python overhead, which removing a sublayer also saves, so on a small
model measured speedups can exceed it.

A grid point whose estimated memory exceeds what is available, or that raises an
out-of-memory error, is written with `status=skipped` and the reason; the rest continues.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import platform
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import psutil
import torch

from rt_lib.mindskip.architecture import find_decoder
from rt_lib.mindskip.moe import moe_layers
from rt_lib.speed.timing import grid_tokens, measure_point, measured_bound, sublayer_ms
from rt_lib.speed.variants import VARIANTS, baseline_static_layers, build_variants, choose_skip_layers
from rt_lib.speed.roofline import (
    REGIMES,
    Shape,
    bound_curves,
    bound_speedup,
    estimate_point_bytes,
    measure_peaks,
)

log = logging.getLogger(__name__)

COLUMNS = [
    "regime", "variant", "batch_size", "seq_len", "new_tokens", "median_ms", "p10_ms", "p90_ms",
    "tokens_per_s", "skip_ratio", "kv_bytes", "speedup", "bound_speedup", "roofline_speedup", "status", "reason",
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
    static_layers: list[int] | None = None  # static_drop set; None: rt_lib.tuning.baselines, else omitted
    threshold: float | None = None   # router threshold for `mindskip`; None: the checkpoint's
    warmup: int = 1                  # untimed rounds of every variant per grid point
    repeats: int = 5                 # timed interleaved rounds per grid point
    threads: int | None = None       # CPU: torch.set_num_threads; None: all usable cores
    prefill_threads: int | None = None  # CPU: threads of a decode context's untimed prefill; None: all usable cores
    seed: int = 0                    # seeds random prompts (no text given); offsets the text windows
    peak_flops: float | None = None  # roofline; None: measured at start
    bandwidth: float | None = None   # bytes/s; None: measured at start
    memory_headroom: float = 0.9     # a point runs only if its estimate < headroom * available


# The named grids (``grid(name)``): which points are measured, how often, at what cost.
PROFILE_GRIDS = {
    # tiny random models in tests: seconds. One thread, for the untimed prefills too: a few tokens
    # through a tiny model gain nothing from more, and threads spinning against other jobs slow
    # them many times
    "smoke": ProfileSettings(prefill_batch_sizes=[1, 2], prefill_seq_lens=[8],
                             decode_batch_sizes=[1, 2], decode_context_lens=[8], new_tokens=3,
                             skip_k=2, warmup=1, repeats=2, threads=1, prefill_threads=1),
    # embedded SmolLM2-135M on a 2-core CPU: a few minutes. Short prompts and contexts (128)
    # beside long-context batched decode (8 x 1024), where skipping attention saves the most:
    # per step, attention reads the whole KV cache. One thread: speedups are ratios and barely
    # depend on it, while two threads on a 2-core machine shared with other jobs spin against
    # them (a 1x128 forward measured 20x slower than with one thread)
    "quick": ProfileSettings(decode_batch_sizes=[1, 8], decode_context_lens=[128, 1024], new_tokens=8,
                             threads=1),
    # the whole grid, meant for a GPU; points that do not fit are reported as skipped
    "full": ProfileSettings(prefill_batch_sizes=[1, 4, 16, 64], prefill_seq_lens=[128, 512, 2048, 8192],
                            decode_batch_sizes=[1, 8, 32, 128], decode_context_lens=[512, 2048, 8192],
                            new_tokens=64, warmup=3, repeats=10, skip_k=8),
}


def grid(name: str, **overrides) -> ProfileSettings:
    """The settings of the grid ``name`` of ``PROFILE_GRIDS`` with ``overrides`` (``ProfileSettings``
    fields); ``ValueError`` naming the grids for any other name."""
    if name not in PROFILE_GRIDS:
        raise ValueError(f"unknown profile grid {name!r}; grids: {', '.join(PROFILE_GRIDS)}")
    return replace(copy.deepcopy(PROFILE_GRIDS[name]), **overrides)


def grid_points(settings: ProfileSettings) -> list[tuple[str, int, int]]:
    """The (regime, batch size, sequence or context length) points to measure, prefill first."""
    points = [("prefill", b, s) for b in settings.prefill_batch_sizes for s in settings.prefill_seq_lens]
    points += [("decode", b, s) for b in settings.decode_batch_sizes for s in settings.decode_context_lens]
    return [p for p in points if p[0] in settings.regimes]


# --------------------------------------------------------------------------- memory

def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the device (CUDA: mem_get_info; CPU: the memory available to new
    processes without swapping, psutil's `available`)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return int(psutil.virtual_memory().available)


# --------------------------------------------------------------------------- the profile

def profile(ms, settings: ProfileSettings, tokens: torch.Tensor | None = None, progress: bool = True):
    """Measure every variant over the settings' grid. `ms`: a MindSkipModel (see `prepare_models`);
    `tokens`: a 1-D tensor of token ids the prompts are cut from (None: random ids; speed does
    not depend on the text, but router decisions do). The CPU thread count of `settings.threads`
    holds while profiling; the process's own count is back afterwards.
    Returns (rows: list of dicts with COLUMNS, conditions: dict for profile.json)."""
    threads_before = torch.get_num_threads()
    try:
        return _profile(ms, settings, tokens, progress)
    finally:
        torch.set_num_threads(threads_before)


def _profile(ms, settings: ProfileSettings, tokens: torch.Tensor | None, progress: bool):
    from tqdm.auto import tqdm

    device = next(ms.model.parameters()).device
    dtype = next(ms.model.parameters()).dtype
    dtype_bytes = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    shape = Shape.from_config(ms.model.config, sparse_layers=len(moe_layers(find_decoder(ms.model)[1])))
    threads, load_before = _set_threads(device, settings)
    ms.eval()

    skip_layers, static_layers = layer_sets(ms, settings, shape, device, tokens)
    omitted = omitted_variants(ms, settings, static_layers)
    names = [n for n in settings.variants if n not in omitted]
    variants = build_variants(ms, names, skip_layers, static_layers, settings.threshold)
    peak_flops, bandwidth = settings.peak_flops, settings.bandwidth
    if peak_flops is None or bandwidth is None:
        measured = measure_peaks(device, dtype)
        peak_flops, bandwidth = peak_flops or measured[0], bandwidth or measured[1]
    bound = {"shape": shape, "n_routed": len(ms.routed_layers), "granularity": ms.config.granularity,
             "peak_flops": peak_flops, "bandwidth": bandwidth, "dtype_bytes": dtype_bytes}

    points = grid_points(settings)
    rows, raw, sub_times = [], [], []
    for regime, batch, seq_len in tqdm(points, desc="profile", disable=not progress):
        new = settings.new_tokens if regime == "decode" else 0
        base_row = {"regime": regime, "batch_size": batch, "seq_len": seq_len, "new_tokens": new}
        results, reason = _run_point(variants, base_row, settings, device, shape, dtype_bytes, tokens)
        if reason is not None:
            log.warning("%s batch=%d seq_len=%d skipped: %s", regime, batch, seq_len, reason)
            rows += [dict(base_row, variant=v.name, status="skipped", reason=reason) for v in variants]
            continue
        point_rows, point_raw = _point_rows(variants, results, base_row, bound)
        rows += point_rows
        raw += [r for r in point_raw if not r.get("sublayers")]
        sub_times += [r for r in point_raw if r.get("sublayers")]

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
        "omitted": omitted,
        "prompts": "random token ids" if tokens is None else f"windows of {tokens.numel()} given text tokens",
        "threshold": ms.config.threshold,  # in effect for the `mindskip` variant
        "roofline": {"peak_flops": peak_flops, "bandwidth_bytes_per_s": bandwidth, "dtype_bytes": dtype_bytes,
                     "measured": settings.peak_flops is None or settings.bandwidth is None},
        "bound_curves": bound_curves(shape, points, len(ms.routed_layers), peak_flops, bandwidth, dtype_bytes,
                                     settings.new_tokens, ms.config.granularity),
        "granularity": ms.config.granularity,
        "settings": asdict(settings),
        **_provenance(),
        "measurements": raw,
        "sublayer_times": sub_times,
    }
    return rows, conditions


def _set_threads(device, settings) -> tuple[int, list[float]]:
    """Fix the CPU thread count; warn when the machine is busier than its cores. Returns
    (threads in effect, load average before the run)."""
    if device.type == "cpu":
        torch.set_num_threads(settings.threads or len(os.sched_getaffinity(0)))
    threads = torch.get_num_threads()
    load_before = list(os.getloadavg())
    if device.type == "cpu" and load_before[0] > len(os.sched_getaffinity(0)):
        log.warning("load average %.1f on %d usable cores with %d threads: timings will be noisy",
                    load_before[0], len(os.sched_getaffinity(0)), threads)
    return threads, load_before


def layer_sets(ms, settings, shape, device, tokens) -> tuple[list[int], list[int] | None]:
    """The settings' skip and static-drop layer lists, or the ones the routers (on a calibration
    batch: the largest prefill point) and rt_lib.tuning.baselines choose (no static-drop list
    for `moe` routers unless given: see `omitted_variants`)."""
    skip_layers = settings.skip_layers
    if skip_layers is None:
        calib = grid_tokens(max(settings.prefill_batch_sizes), max(settings.prefill_seq_lens), shape.vocab,
                            settings.seed, tokens).to(device)
        skip_layers = choose_skip_layers(ms, calib, settings.skip_k)
    static_layers = settings.static_layers
    if static_layers is None and "static_drop" in settings.variants and ms.config.granularity != "moe":
        static_layers = baseline_static_layers(ms, len(skip_layers))
    return skip_layers, static_layers


def omitted_variants(ms, settings, static_layers) -> dict[str, str]:
    """The variants of the settings that will not run, each with the reason (profile.json
    ``omitted``): ``static_drop`` without a layer list. It removes attention; for `moe`
    routers, which gate the sparse MoE blocks and skip no attention, no list is chosen unless
    ``static_layers`` gives one."""
    if "static_drop" not in settings.variants or static_layers:
        return {}
    if ms.config.granularity == "moe":
        why = ("static_drop removes attention, which routers at granularity 'moe' never skip (they gate the sparse "
               "MoE blocks): no comparison for them; pass static_layers to time it anyway")
    else:
        why = "no layer list (static_layers) and none from rt_lib.tuning.baselines"
    log.warning("static_drop omitted: %s", why)
    return {"static_drop": why}


def _run_point(variants, base_row, settings, device, shape, dtype_bytes, tokens):
    """(results of `measure_point`, None), or (None, why the point was skipped): its memory
    estimate does not fit, or it ran out of memory. Other errors propagate."""
    regime, batch, seq_len, new = (base_row[k] for k in ("regime", "batch_size", "seq_len", "new_tokens"))
    need = estimate_point_bytes(shape, regime, batch, seq_len, new, dtype_bytes)
    free = available_memory(device)
    if free is not None and need > settings.memory_headroom * free:
        return None, (f"estimated {need / 2**30:.2f} GiB > {settings.memory_headroom:.0%} of "
                      f"{free / 2**30:.2f} GiB available")
    try:
        results = measure_point(variants, regime, batch, seq_len, settings, device, shape.vocab, tokens)
        dense = next((v for v in variants if v.name == "dense"), None)
        if dense is not None:
            results["__sublayers__"] = sublayer_ms(dense, regime, batch, seq_len, settings, device, shape.vocab,
                                                   tokens)
        return results, None
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        return None, "out of memory: " + str(exc).strip().splitlines()[0][:200]
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _point_rows(variants, results, base_row, bound) -> tuple[list[dict], list[dict]]:
    """The profile.csv rows of one measured grid point (speedups against its dense median) and
    its raw per-round measurements for profile.json."""
    regime, batch, seq_len, new = (base_row[k] for k in ("regime", "batch_size", "seq_len", "new_tokens"))
    dense_median_ms = None
    rows, raw = [], []
    total_ms, sublayers = results.get("__sublayers__", (None, {}))
    for v in variants:
        rs = results[v.name]
        times = [r["time_ms"] for r in rs]
        # linear interpolation between the closest ranks
        p10, med, p90 = (float(x) for x in np.percentile(times, [10, 50, 90]))
        ratio = sum(r["skip_ratio"] for r in rs) / len(rs)
        n_tokens = batch * (seq_len if regime == "prefill" else 1)
        # the bound for the sublayers this variant's decisions skip (for `mask`: what skipping
        # them for real could reach); static drop removes attention whatever the routers gate
        kind = "attn" if v.name == "static_drop" else bound["granularity"]
        roofline = bound_speedup(bound["shape"], regime, batch, seq_len, ratio * bound["n_routed"],
                                 bound["peak_flops"], bound["bandwidth"], bound["dtype_bytes"], max(new, 1),
                                 granularity=kind)
        skipped = _mean_skipped([r.get("skipped", {}) for r in rs])
        measured = measured_bound(total_ms, sublayers, skipped, v.granularity) if total_ms else float("nan")
        rows.append(dict(base_row, variant=v.name, median_ms=med, p10_ms=p10, p90_ms=p90, tokens_per_s=n_tokens * 1e3 / med,
                         skip_ratio=ratio, kv_bytes=rs[-1]["kv_bytes"], bound_speedup=measured,
                         roofline_speedup=roofline, status="ok", reason=""))
        raw.append(dict(base_row, variant=v.name, times_ms=times, kv_bytes_prefill=rs[-1]["kv_bytes_prefill"],
                        kv_bytes=rs[-1]["kv_bytes"], skipped={str(k): f for k, f in skipped.items()}))
        if v.name == "dense":
            dense_median_ms = med
    for r in rows:
        r["speedup"] = dense_median_ms / r["median_ms"] if dense_median_ms else float("nan")
    if total_ms:
        # read by `profile`: the dense model's hooked sublayer times behind bound_speedup
        raw.append(dict(base_row, sublayers=True, dense_hooked_ms=total_ms,
                        sublayer_ms={f"{layer}.{kind}": t for (layer, kind), t in sorted(sublayers.items())}))
    return rows, raw


def _mean_skipped(per_round: list[dict[int, float]]) -> dict[int, float]:
    """Per layer, the mean over rounds of the fraction of its sublayer executions skipped."""
    layers = {layer for d in per_round for layer in d}
    return {layer: sum(d.get(layer, 0.0) for d in per_round) / max(len(per_round), 1) for layer in sorted(layers)}


def _device_name(device):
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{platform.processor() or platform.machine()}"


def _provenance():
    """Versions, git revision and device from rt_lib.runs.record (the run.json fields)."""
    from rt_lib.runs.record import provenance

    prov = provenance()
    prov.pop("threads", None)  # the profiler's own, set above, is the one that applies
    return prov


# --------------------------------------------------------------------------- results

def summarize(rows) -> pd.DataFrame:  # noqa: F821
    """One line per grid point: MindSkip (forced) as a fraction of the oracle's speedup, the
    mask variant's speedup, the measured KV saving, and the bound beside each."""
    import pandas as pd

    df = pd.DataFrame(rows)
    ok = df[df.status == "ok"]
    out = []
    for (regime, b, s), g in ok.groupby(["regime", "batch_size", "seq_len"], sort=False):
        v = g.set_index("variant")

        def get(name, col, v=v):
            return v.at[name, col] if name in v.index else float("nan")
        line = {"regime": regime, "batch_size": b, "seq_len": s, "dense_ms": get("dense", "median_ms")}
        for name in ("mindskip_forced", "oracle", "mindskip", "mask", "static_drop"):
            if name in v.index:
                line[f"{name}_speedup"] = get(name, "speedup")
        line["forced/oracle"] = get("mindskip_forced", "speedup") / get("oracle", "speedup")
        line["skip_ratio_forced"] = get("mindskip_forced", "skip_ratio")
        line["kv_saving"] = 1 - get("mindskip_forced", "kv_bytes") / get("dense", "kv_bytes")
        line["bound_oracle"] = get("oracle", "bound_speedup")
        line["oracle/bound"] = get("oracle", "speedup") / get("oracle", "bound_speedup")
        # noise: the oracle passes the bound beyond noise only if even its least favourable rounds
        # (dense p10 against oracle p90) give a speedup above it
        line["oracle_low/bound"] = get("dense", "p10_ms") / get("oracle", "p90_ms") / get("oracle", "bound_speedup")
        line["mindskip/bound"] = get("mindskip", "speedup") / get("mindskip", "bound_speedup")
        out.append(line)
    return pd.DataFrame(out)

"""GPU check: MindSkip's speed at the paper's scale, on a bare GPU machine.

    bash benchmarks/gpu_check.sh --prepare                  # here: the wheels to carry and the command
    python3 benchmarks/gpu_check.py --out $OUT/gpu-check    # there: python3 + CUDA torch + transformers
    python3 benchmarks/gpu_check.py --estimate              # the plan and its time estimate, nothing run
    python3 benchmarks/gpu_check.py --dry-run               # the same code path on a CPU, tiny shapes

The question: the paper reports 1.21x at about 25% of attention layers skipped. Is that reachable
on Llama-3-8B, and in which regime (prefill, or decode at which batch and context)? Timing needs no
trained weights: the routing decisions are forced, and the oracle removes the same layers. The
model is built from ``tests/fixtures/llama3-8b-config`` (Llama-3-8B's config.json) with random
bfloat16 weights created directly on the GPU (default dtype bfloat16 under ``torch.device("cuda")``,
so no float32 copy is ever made; transformers' normal init runs on the GPU in a fraction of a
second). Attention is SDPA.

Variants, all on the same weights (``rt_lib.speed.variants``: one MindSkip model, its gates taken
out for the plain variants; routers on the deeper half, layers L/2-1 .. L-2, i.e. 15..30 of 32):
- ``dense``: the base model.
- ``oracle_k``: the attention sublayers of the k skipped layers removed
  (``rt_lib.mindskip.removal.drop_sublayers``): the best any skipping of them can do.
- ``mindskip_k``: MindSkip with sequence-level routing, decisions forced (``ms.force``: the k
  layers skipped, every other routed layer kept), real skip (the skipped layers store no KV).
- ``mask_k``: the same forced decisions in ``ms.set_execution("mask")``: compute, then multiply
  by the decision; the compute-then-mask reference, expected at about 1.0x.
The k skipped layers are the last k before the final layer (L-1-k .. L-2: 27..30 for k=4,
23..30 for k=8 of 32), deterministic and inside the routed deeper half.

Points (one row per variant and point):
- prefill: one forward of batch x 2048 tokens into a fresh ``DynamicCache`` (the KV cache is
  written), ``logits_to_keep=1``; batch 1 and 8. Warm-up rounds, then rounds of every variant in
  alternating order (``rt_lib.speed.timing.interleave``); each forward timed with CUDA events after a
  synchronize; the median over rounds.
- decode: batch 1, 16, 64 at context 2048 and 4096. The context is not prefilled batch x context
  through the model: one row is prefilled into a fresh cache, then expanded to the batch with
  ``cache.reorder_cache(zeros(batch))`` (MindSkip follows cache reorders for its stored decisions,
  ``MindSkipModel._follow_reorders``); then warm-up steps and timed single-token steps, each step
  timed with a chain of CUDA events (no synchronize between steps); the median over the timed
  steps of every round. Each variant builds its own context in every round, so only one variant's
  cache is held at a time.
- speedup: the dense median / the variant's median at the same point. tokens/s: batch x tokens
  of one forward / its median time.
- bound: from the dense model's own sublayer times, as the CPU profiler does
  (``rt_lib.speed.timing.sublayer_ms`` / ``measured_bound``): in a separate pass (so that hooks never
  slow the timed rounds) every attention sublayer of the dense model is bracketed by CUDA events
  in forward pre/post hooks; bound = dense time / (dense time - the time of the k removed
  attention sublayers). The oracle can approach it, not pass it beyond noise.
- KV bytes: the bytes of the keys and values the cache holds after the prefill (prefill) or at
  the context (decode, after the expansion), summed over the cache's tensors
  (``rt_lib.speed.timing.kv_cache_bytes``); a skipped layer stores none, so ``oracle_k`` and
  ``mindskip_k`` save exactly k/L of the dense bytes. kv_saved = 1 - kv / dense kv.
- memory: before a point runs, its KV cache (layers x 2 x kv_heads x head_dim x batch x tokens x 2
  bytes) and activations are estimated against the free GPU memory (the weights are resident);
  a point that does not fit, or runs out of memory, is a row with status ``skipped`` and the
  reason, and the check goes on.

Correctness (tiny random Llama on the same device, seconds; a failure is reported, never stops
the timing): for SDPA, and flash_attention_2 where ``import flash_attn`` works,
``skip == mask`` (logits of execution "skip" and "mask" under mixed per-sequence or per-token
decisions from random routers with large weights, a left-padded batch) and ``cached == uncached``
(greedy ``generate`` against a recomputation of the whole sequence at every step) under token
routing, and under sequence routing. Token routing needs eager or SDPA attention
(``rt_lib.mindskip.architecture``): for other implementations those checks are ``n/a``.

Time estimate (printed before anything runs; ``--estimate`` prints only it): per forward
``max(FLOPs / 700e12, bytes / 4.0e12, layers x 0.4 ms)``. Prefill FLOPs = 2 x decoder parameters x
tokens + 2 x hidden x vocab x batch (the LM head on the last token) + 4 x layers x batch x
length^2 x hidden / 2 (causal attention scores and values); prefill bytes = the weights read
once + the KV cache written. A decode step reads the weights and the cache three times
(transformers' ``DynamicCache`` concatenates: the cache is read and rewritten at every step, then
read by attention): bytes = weight bytes + 3 x batch x context x (layers x 2 x kv_heads x
head_dim x 2); FLOPs = 2 x parameters x batch + 4 x layers x batch x context x hidden. 0.4 ms per
decoder layer is an assumed host floor (Python and kernel launches of eager transformers; it
dominates decode at small batches). A decode round of one variant costs one 1 x context prefill,
the expansion copy (2 x the cache bytes / bandwidth) and its steps. Every variant is counted at
the dense cost (an upper estimate), plus 30 s of setup (imports, CUDA start, building the model)
and 10 s of correctness checks. ``--budget-s`` (default 420) lowers repeats, then steps and
rounds, until the estimate fits. The defaults are estimated at 109 s (1.8 minutes) on one
H100/H200-class GPU; kernels below the peaks or a slower host can double that.

What the GPU machine needs, and why nothing is carried by default: python3 with a CUDA build of
torch, transformers >= 5.17 (the GPU machine's release, with which the dry run and its checks
pass; ``rt_lib.mindskip`` needs transformers 5's cache layers, ``cache_utils.DynamicLayer``) and the repository's working tree
(``rt_lib/`` from source; the script puts the repository root on ``sys.path``). The kit pins
transformers 5.24.0 (pyproject.toml, environment.yml); its pin exists for the GGUF assets, which
this check does not use. Carrying it was evaluated first: transformers 5.24.0 is one wheel of
13.5 MB whose hard requirements (huggingface-hub >= 1.31, tokenizers 0.23, safetensors 0.8,
numpy, pyyaml, regex, tqdm, packaging, typer) the GPU machine already has in compatible
versions (``import transformers`` and its Llama import nothing beyond those, torch and the
standard library, apart from optional packages used when present); but the working tree that
travels is about 53.7 MB and the limit is 64 MiB (67.1 MB), which leaves 13.4 MB: it does not fit.
So the check uses the machine's transformers (5.17.0 there), prints the versions it ran with and
refuses, with what to do, when transformers is missing or older. ``--prepare
--pinned-transformers`` downloads transformers 5.24.0 into ``.whl/`` anyway and carries it
whenever the tree is small enough (the size accounting refuses otherwise).

Output, into ``--out`` (default ``gpu-check-out``; three files, rewritten after every point so an
interrupted run leaves what it measured): ``gpu_check.csv`` (one row per point and variant, and
one per correctness check), ``gpu_check.json`` (settings, versions, device, the estimate, every
row, the checks and the claim summary) and ``summary.txt`` (the table printed at the end).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "tests" / "fixtures" / "llama3-8b-config" / "config.json"
WHEEL_DIR = ROOT / ".whl"
RUN_COMMAND_FILE = "RUN_COMMAND.txt"
LIMIT_BYTES = 64 * 2**20  # what travels to the GPU machine: the working tree and the carried wheels
PINNED_TRANSFORMERS = "5.24.0"  # pyproject.toml / environment.yml: transformers>=5.24,<6; the kit's venv
MIN_TRANSFORMERS = (5, 17, 0)
PIP_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
INSTALL_WHEELS = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
                  "--target /tmp/site .whl/*.whl")

PEAK_FLOPS = 700e12      # bf16 dense matmul an H100/H200-class GPU reaches
BANDWIDTH = 4.0e12       # bytes/s of its HBM
HOST_MS_PER_LAYER = 0.4  # assumed host floor of one decoder layer of eager transformers
SETUP_S = 30.0           # assumed: imports, CUDA start, the model built on the GPU
CHECKS_S = 10.0          # assumed: the correctness checks on a tiny model
REFERENCE_MAIN_TABLE = ROOT / "results" / "reference" / "main_table.csv"  # the paper's numbers (rt_lib.paper)


def paper_speedup(path: Path = REFERENCE_MAIN_TABLE) -> float:
    """The paper's main-table speedup of Router-Tuning on Llama-3-8B (attention, sequence routing),
    read from the reference data the kit's tables and claims read (plain csv: no pandas here)."""
    with open(path, encoding="utf-8") as f:
        for row in csv.DictReader(line for line in f if not line.startswith("#")):
            if (row["model"], row["method"], row["granularity"], row["route_level"]) == (
                    "Llama-3-8B", "router-tuning", "attn", "seq"):
                return float(row["speedup"])
    raise ValueError(f"{path}: no Llama-3-8B router-tuning attn/seq row")


CLAIM_SPEEDUP = paper_speedup()  # the paper's speedup ...
CLAIM_SKIP = 0.25        # ... at about this fraction of attention layers skipped

FIELDS = ["regime", "batch", "context", "variant", "k", "skipped_layers", "median_ms", "samples", "tokens_per_s",
          "speedup", "bound", "kv_bytes", "kv_saved", "status", "reason"]


@dataclasses.dataclass
class Settings:
    """What one check runs. ``GPU`` is the real check, ``DRY_RUN`` the same code on a CPU."""

    dry_run: bool
    device: str
    dtype: str
    model_overrides: dict
    prefill_len: int
    prefill_batches: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    ks: tuple[int, ...]
    warmup: int          # prefill: untimed rounds of every variant
    repeats: int         # prefill: timed rounds
    decode_rounds: int   # decode: rounds, each variant building its context and stepping
    decode_warmup: int   # decode: untimed steps per round
    decode_steps: int    # decode: timed steps per round
    bound_rounds: int    # bound pass: prefill forwards
    bound_steps: int     # bound pass: decode steps
    budget_s: float
    threads: int | None = None
    seed: int = 0
    memory_headroom: float = 0.9


GPU = Settings(dry_run=False, device="cuda", dtype="bfloat16", model_overrides={}, prefill_len=2048,
               prefill_batches=(1, 8), decode_batches=(1, 16, 64), decode_contexts=(2048, 4096), ks=(4, 8),
               warmup=2, repeats=5, decode_rounds=3, decode_warmup=3, decode_steps=16, bound_rounds=2,
               bound_steps=8, budget_s=420.0)
TINY = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 256, "bos_token_id": 1,
        "eos_token_id": 2}
DRY_RUN = Settings(dry_run=True, device="cpu", dtype="float32", model_overrides=TINY, prefill_len=32,
                   prefill_batches=(1, 2), decode_batches=(1, 2, 4), decode_contexts=(16, 32), ks=(1, 2),
                   warmup=1, repeats=2, decode_rounds=2, decode_warmup=1, decode_steps=3, bound_rounds=1,
                   bound_steps=2, budget_s=420.0, threads=1)


# ============================================================================ shapes and the estimate
_SHAPE = None


def _shape_class():
    """``Shape``, made on first use: it extends ``rt_lib.speed.roofline.Shape``, which imports torch,
    and ``--prepare`` runs without torch."""
    global _SHAPE
    if _SHAPE is None:
        from types import SimpleNamespace

        from rt_lib.speed.roofline import Shape as DecoderShape, estimate_kv_bytes

        class Shape(DecoderShape):
            """The kit's decoder sizes with what the check adds: building them from config.json,
            the parameter count and KV bytes."""

            @classmethod
            def from_dict(cls, d: dict) -> Shape:
                return cls.from_config(SimpleNamespace(**d))

            @property
            def layers(self) -> int:
                return self.num_layers

            @property
            def layer_params(self) -> int:
                """Parameters of the decoder layers' matrices (attention q/k/v/o, MLP gate/up/down)."""
                q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
                return self.layers * (self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate)

            @property
            def params(self) -> int:
                """Every parameter: decoder layers, embedding, LM head (untied), norms."""
                return self.layer_params + 2 * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

            def kv_bytes(self, tokens: int, dtype_bytes: int = 2, layers: int | None = None) -> int:
                """Keys and values of ``tokens`` cached tokens (batch x length) in ``layers`` layers."""
                return estimate_kv_bytes(self, tokens, dtype_bytes, layers)

        _SHAPE = Shape
    return _SHAPE


def __getattr__(name: str):
    if name == "Shape":
        return _shape_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_config(overrides: dict | None = None) -> dict:
    d = json.loads(CONFIG.read_text())
    d.update(overrides or {})
    return d


def routed_layers(num_layers: int) -> list[int]:
    """The deeper half, the final layer left dense: L/2-1 .. L-2 (15..30 of 32)."""
    n = num_layers // 2
    return list(range(num_layers - 1 - n, num_layers - 1))


def skipped_layers(num_layers: int, k: int) -> list[int]:
    """The k layers skipped (and removed by the oracle): the last k before the final layer."""
    routed = routed_layers(num_layers)
    if not 0 < k <= len(routed):
        raise ValueError(f"k={k}: choose 1..{len(routed)} (the routed layers {routed[0]}..{routed[-1]})")
    return routed[-k:]


def variant_names(ks) -> list[str]:
    return ["dense"] + [f"{kind}_{k}" for k in ks for kind in ("oracle", "mindskip", "mask")]


def points(s: Settings) -> list[tuple[str, int, int]]:
    """(regime, batch, prefill length or decode context), prefill first."""
    return ([("prefill", b, s.prefill_len) for b in s.prefill_batches]
            + [("decode", b, c) for c in s.decode_contexts for b in s.decode_batches])


def forward_seconds(shape: Shape, batch: int, new: int, past: int, dtype_bytes: int = 2,
                    peak_flops: float = PEAK_FLOPS, bandwidth: float = BANDWIDTH,
                    host_ms_per_layer: float = HOST_MS_PER_LAYER) -> float:
    """Estimated seconds of one forward of ``new`` tokens per row on ``past`` cached ones (see
    the module docstring): the slowest of compute, memory traffic and the host floor."""
    s = shape
    weights = (s.layer_params + s.vocab * s.hidden) * dtype_bytes  # read once per forward
    kv_token = s.kv_bytes(1, dtype_bytes)
    flops = 2 * s.layer_params * batch * new + 2 * s.hidden * s.vocab * batch
    flops += 4 * s.layers * batch * new * past * s.hidden + 4 * s.layers * batch * new * new * s.hidden / 2
    # DynamicCache concatenates: each forward reads and rewrites the cache, then attention reads it
    nbytes = weights + batch * kv_token * (3 * past + 2 * new)
    return max(flops / peak_flops, nbytes / bandwidth, s.layers * host_ms_per_layer / 1e3)


def estimate(shape: Shape, s: Settings, **peaks) -> dict:
    """The time the check will take: per point, per forward, and in total (seconds)."""
    n_var = len(variant_names(s.ks))
    rows = []
    for regime, batch, length in points(s):
        if regime == "prefill":
            fwd = forward_seconds(shape, batch, length, 0, **peaks)
            forwards = n_var * (s.warmup + s.repeats) + s.bound_rounds
            secs = forwards * fwd
        else:
            context = forward_seconds(shape, 1, length, 0, **peaks)
            context += 2 * shape.kv_bytes(batch * length) / peaks.get("bandwidth", BANDWIDTH)
            fwd = forward_seconds(shape, batch, 1, length, **peaks)
            steps = s.decode_warmup + s.decode_steps
            forwards = n_var * s.decode_rounds * steps + 1 + s.bound_steps
            secs = (n_var * s.decode_rounds + 1) * context + forwards * fwd
        rows.append({"regime": regime, "batch": batch, "context": length, "forward_ms": fwd * 1e3,
                     "forwards": forwards, "seconds": secs})
    total = SETUP_S + CHECKS_S + sum(r["seconds"] for r in rows)
    return {"points": rows, "setup_s": SETUP_S, "checks_s": CHECKS_S, "total_s": total,
            "method": "max(FLOPs / peak, bytes / bandwidth, layers x host ms) per forward", "peak_flops":
            peaks.get("peak_flops", PEAK_FLOPS), "bandwidth": peaks.get("bandwidth", BANDWIDTH),
            "host_ms_per_layer": peaks.get("host_ms_per_layer", HOST_MS_PER_LAYER)}


def fit_budget(shape: Shape, s: Settings) -> tuple[Settings, list[str]]:
    """``s`` with fewer repeats, steps and rounds until the estimate fits ``s.budget_s``."""
    ladder = [("repeats", 3), ("decode_steps", 8), ("decode_rounds", 2), ("warmup", 1), ("repeats", 2),
              ("decode_rounds", 1), ("decode_steps", 4), ("bound_steps", 2), ("repeats", 1)]
    notes = []
    for name, floor in ladder:
        if estimate(shape, s)["total_s"] <= s.budget_s:
            break
        if getattr(s, name) > floor:
            notes.append(f"{name} {getattr(s, name)} -> {floor}")
            s = dataclasses.replace(s, **{name: floor})
    left = estimate(shape, s)["total_s"]
    if left > s.budget_s:
        notes.append(f"still estimated at {left:.0f} s > --budget-s {s.budget_s:.0f}: fewer points would be needed")
    return s, notes


def format_estimate(est: dict) -> str:
    lines = [f"time estimate ({est['method']}; peak {est['peak_flops'] / 1e12:.0f} TFLOP/s, "
             f"{est['bandwidth'] / 1e12:.1f} TB/s, {est['host_ms_per_layer']} ms per layer):"]
    for r in est["points"]:
        lines.append(f"  {r['regime']:<8} batch {r['batch']:>3} x {r['context']:>5}: {r['forward_ms']:8.2f} ms per "
                     f"forward, {r['forwards']:>4} forwards -> {r['seconds']:6.1f} s")
    lines.append(f"  setup {est['setup_s']:.0f} s + correctness checks {est['checks_s']:.0f} s; "
                 f"total {est['total_s']:.0f} s ({est['total_s'] / 60:.1f} min)")
    return "\n".join(lines)


# ============================================================================ environment
def _version_tuple(v: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string: "5.17.0" -> (5, 17, 0), "5.24.0.dev0" -> (5, 24, 0)."""
    import re

    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def require_stack() -> dict:
    """torch and transformers as this check needs them, or SystemExit saying what to do.
    Returns the versions it runs with."""
    try:
        import torch
    except ImportError:
        raise SystemExit("error: torch is not installed; this check needs python3 with a CUDA build of torch") from None
    hint = (f"install transformers>={'.'.join(map(str, MIN_TRANSFORMERS))} (the kit pins {PINNED_TRANSFORMERS}), or "
            "carry it: `bash benchmarks/gpu_check.sh --prepare --pinned-transformers` here, then the command it "
            "prints on the GPU machine")
    try:
        import transformers
    except ImportError as e:
        raise SystemExit(f"error: transformers cannot be imported ({e}); {hint}") from None
    if _version_tuple(transformers.__version__) < MIN_TRANSFORMERS:
        raise SystemExit(f"error: transformers {transformers.__version__} is older than "
                         f"{'.'.join(map(str, MIN_TRANSFORMERS))}, which rt_lib.mindskip needs here; {hint}")
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer  # noqa: F401 - rt_lib.mindskip uses them
    except ImportError as e:
        raise SystemExit(f"error: transformers {transformers.__version__} lacks the cache layers rt_lib.mindskip "
                         f"uses ({e}); {hint}") from None
    return versions()


def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "transformers_path": str(Path(transformers.__file__).parent)}
    for name in ("huggingface_hub", "tokenizers", "safetensors", "numpy", "flash_attn"):
        try:
            out[name] = getattr(__import__(name), "__version__", "?")
        except Exception:  # noqa: BLE001 - optional; a broken install is as good as absent here
            out[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(device=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
                   device_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        out["device"] = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return out


# ============================================================================ the model
def build_model(config: dict, dtype, device, attn_implementation: str = "sdpa"):
    """A LlamaForCausalLM of ``config`` with random weights, created directly on ``device`` in
    ``dtype`` (the default dtype while it is built: no float32 copy)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_dict({k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    cfg._attn_implementation = attn_implementation
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    return model.eval()


def make_variants(ms, ks, num_layers: int) -> list:
    """dense, then oracle_k, mindskip_k, mask_k for each k (``rt_lib.speed.variants`` on one model)."""
    from rt_lib.speed.variants import build_variants

    out = []
    for k in ks:
        dense, mindskip, oracle, mask = build_variants(ms, ["dense", "mindskip_forced", "oracle", "mask"],
                                                       skipped_layers(num_layers, k))
        if not out:
            out.append(dense)
        out += [dataclasses.replace(oracle, name=f"oracle_{k}"), dataclasses.replace(mindskip, name=f"mindskip_{k}"),
                dataclasses.replace(mask, name=f"mask_{k}")]
    return out


# ============================================================================ timing
class Marks:
    """Time stamps on the device's timeline: CUDA events (no synchronize when taken), or the
    wall clock on a CPU. ``ms(a, b)`` after ``sync()``."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def random_ids(batch: int, length: int, vocab: int, seed: int, device):
    import torch

    g = torch.Generator().manual_seed(seed + 7919 * batch + length)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def decode_context(model, prompt, batch: int, device):
    """A cache holding the context ``prompt`` (1 x context) for ``batch`` rows: one row prefilled,
    then expanded with ``cache.reorder_cache`` (which MindSkip's stored decisions follow)."""
    import torch

    from rt_lib.speed.timing import forward_step, new_cache

    cache = new_cache(model)
    forward_step(model, prompt, cache, 0)
    if batch > 1:
        cache.reorder_cache(torch.zeros(batch, dtype=torch.long, device=device))
    return cache


def timed_steps(model, cache, tokens, start: int, device) -> list[float]:
    """Milliseconds of each single-token step of ``tokens`` (batch x steps) from position ``start``:
    a chain of marks, one between consecutive steps, synchronized once at the end."""
    from rt_lib.speed.timing import forward_step

    marks = Marks(device)
    marks.sync()
    stamps = [marks.mark()]
    for i in range(tokens.shape[1]):
        forward_step(model, tokens[:, i:i + 1], cache, start + i)
        stamps.append(marks.mark())
    marks.sync()
    return [marks.ms(a, b) for a, b in zip(stamps, stamps[1:])]


def measure_prefill(variants, batch: int, length: int, s: Settings, device, vocab: int) -> dict[str, dict]:
    """Per variant: the timed forwards (ms) of a batch x length prompt into a fresh cache, and
    the KV bytes that cache holds."""
    import torch

    from rt_lib.speed.timing import forward_step, interleave, kv_cache_bytes, new_cache, timed_ms

    ids = random_ids(batch, length, vocab, s.seed, device)
    by_name = {v.name: v for v in variants}

    def run_once(name):
        v = by_name[name]
        with v.active(), torch.inference_mode():
            cache = new_cache(v.model)
            t = timed_ms(lambda: forward_step(v.model, ids, cache, 0), device)
            kv = kv_cache_bytes(cache)
        return {"ms": [t], "kv": kv}

    runs = interleave(list(by_name), run_once, s.warmup, s.repeats)
    return {name: {"ms": [t for r in rs for t in r["ms"]], "kv": rs[-1]["kv"]} for name, rs in runs.items()}


def measure_decode(variants, batch: int, context: int, s: Settings, device, vocab: int) -> dict[str, dict]:
    """Per variant: the timed decode steps (ms) of every round from a context built by
    ``decode_context``, and the KV bytes held at the context."""
    import torch

    from rt_lib.speed.timing import forward_step, interleave, kv_cache_bytes

    prompt = random_ids(1, context, vocab, s.seed, device)
    tokens = random_ids(batch, s.decode_warmup + s.decode_steps, vocab, s.seed + 1, device)
    by_name = {v.name: v for v in variants}

    def run_once(name):
        v = by_name[name]
        with v.active(), torch.inference_mode():
            cache = decode_context(v.model, prompt, batch, device)
            kv = kv_cache_bytes(cache)
            for i in range(s.decode_warmup):
                forward_step(v.model, tokens[:, i:i + 1], cache, context + i)
            times = timed_steps(v.model, cache, tokens[:, s.decode_warmup:], context + s.decode_warmup, device)
            del cache
        return {"ms": times, "kv": kv}

    runs = interleave(list(by_name), run_once, 0, s.decode_rounds)
    return {name: {"ms": [t for r in rs for t in r["ms"]], "kv": rs[-1]["kv"]} for name, rs in runs.items()}


def attention_times(dense, regime: str, batch: int, length: int, s: Settings, device,
                    vocab: int) -> tuple[float, dict[int, float]]:
    """The dense model's time per forward (prefill) or per step (decode) and each attention
    sublayer's share of it, from marks in forward pre/post hooks of every attention module
    (a pass of its own: the timed rounds run without hooks)."""
    import torch

    from rt_lib.mindskip.architecture import find_decoder, get_slot
    from rt_lib.speed.timing import forward_step, new_cache

    marks = Marks(device)
    spans: dict[int, list] = {}
    recording = [False]

    def hooks(module, layer):
        def pre(*_):
            if recording[0]:
                spans.setdefault(layer, []).append([marks.mark(), None])

        def post(*_):
            if recording[0]:
                spans[layer][-1][1] = marks.mark()
        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    totals = []
    with dense.active(), torch.inference_mode():
        _, layers = find_decoder(dense.model)
        handles = [h for i in range(len(layers)) for h in hooks(get_slot(layers, i, "attn"), i)]
        try:
            if regime == "prefill":
                ids = random_ids(batch, length, vocab, s.seed, device)
                forward_step(dense.model, ids, new_cache(dense.model), 0)  # warm-up, unrecorded
                units = s.bound_rounds
                for _ in range(units):
                    cache = new_cache(dense.model)
                    marks.sync()
                    recording[0] = True
                    a = marks.mark()
                    forward_step(dense.model, ids, cache, 0)
                    totals.append((a, marks.mark()))
                    recording[0] = False
                    del cache
            else:
                prompt = random_ids(1, length, vocab, s.seed, device)
                tokens = random_ids(batch, 1 + s.bound_steps, vocab, s.seed + 1, device)
                cache = decode_context(dense.model, prompt, batch, device)
                forward_step(dense.model, tokens[:, :1], cache, length)  # warm-up, unrecorded
                units = s.bound_steps
                marks.sync()
                recording[0] = True
                for i in range(1, 1 + units):
                    a = marks.mark()
                    forward_step(dense.model, tokens[:, i:i + 1], cache, length + i)
                    totals.append((a, marks.mark()))
                recording[0] = False
                del cache
            marks.sync()
        finally:
            recording[0] = False
            for h in handles:
                h.remove()
    total = sum(marks.ms(a, b) for a, b in totals) / units
    per_layer = {i: sum(marks.ms(a, b) for a, b in sp) / units for i, sp in spans.items()}
    return total, per_layer


# ============================================================================ one point
def point_need_bytes(shape: Shape, regime: str, batch: int, length: int, s: Settings, dtype_bytes: int) -> int:
    """Bytes a point allocates beyond the resident weights: the dense KV cache, a layer's
    activations of the largest forward (prefill: batch x length; decode: the 1-row context
    prefill) and the last-token logits."""
    rows, tokens = (batch, length) if regime == "prefill" else (1, length)
    cached = batch * (length + (s.decode_warmup + s.decode_steps + 1 if regime == "decode" else 0))
    act = rows * tokens * (4 * shape.hidden + 3 * shape.intermediate
                           + 2 * (shape.heads + 2 * shape.kv_heads) * shape.head_dim) * dtype_bytes
    return shape.kv_bytes(cached, dtype_bytes) + act + batch * shape.vocab * 4


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def free_memory(device) -> int | None:
    import torch

    return torch.cuda.mem_get_info()[0] if device.type == "cuda" else None


def run_point(variants, regime: str, batch: int, length: int, s: Settings, shape: Shape, device,
              dtype_bytes: int) -> list[dict]:
    """The rows of one point: measured, or skipped with the reason (memory) or an error."""
    import torch

    from rt_lib.speed.timing import measured_bound

    base = {"regime": regime, "batch": batch, "context": length}
    names = [v.name for v in variants]

    def not_run(status, reason):
        return [dict(base, variant=n, k=_k(n), skipped_layers=_layers(n, shape.layers), status=status,
                     reason=reason) for n in names]

    need, free = point_need_bytes(shape, regime, batch, length, s, dtype_bytes), free_memory(device)
    if free is not None and need > s.memory_headroom * free:
        return not_run("skipped", f"estimated {need / 2**30:.1f} GiB > {s.memory_headroom:.0%} of "
                                  f"{free / 2**30:.1f} GiB free")
    try:
        measure = measure_prefill if regime == "prefill" else measure_decode
        results = measure(variants, batch, length, s, device, shape.vocab)
        total, attn = attention_times(variants[0], regime, batch, length, s, device, shape.vocab)
    except Exception as exc:  # noqa: BLE001 - one point must not end the check
        if _is_oom(exc):
            return not_run("skipped", "out of memory: " + str(exc).strip().splitlines()[0][:160])
        return not_run("error", f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}")
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dense_ms = statistics.median(results["dense"]["ms"])
    dense_kv = results["dense"]["kv"]
    tokens = batch * (length if regime == "prefill" else 1)
    rows = []
    for n in names:
        med = statistics.median(results[n]["ms"])
        layers = skipped_layers(shape.layers, _k(n)) if _k(n) else []
        bound = measured_bound(total, {(i, "attn"): t for i, t in attn.items()}, {i: 1.0 for i in layers}, "attn")
        kv = results[n]["kv"]
        rows.append(dict(base, variant=n, k=_k(n), skipped_layers=_layers(n, shape.layers), median_ms=med,
                         samples=len(results[n]["ms"]), tokens_per_s=tokens * 1e3 / med, speedup=dense_ms / med,
                         bound=bound, kv_bytes=kv, kv_saved=1 - kv / dense_kv if dense_kv else None, status="ok",
                         reason=""))
    rows[0]["reason"] = f"bound pass: dense {total:.3f} ms, attention {sum(attn.values()):.3f} ms"
    return rows


def _k(name: str) -> int:
    return int(name.rsplit("_", 1)[1]) if "_" in name else 0


def _layers(name: str, num_layers: int) -> str:
    k = _k(name)
    return " ".join(map(str, skipped_layers(num_layers, k))) if k else ""


# ============================================================================ correctness
def _tiny_llama(device, dtype, impl: str):
    """The correctness checks' model (no end-of-sequence token: greedy runs never stop early)."""
    import torch

    torch.manual_seed(0)
    return build_model({**read_config(), "num_hidden_layers": 6, "hidden_size": 32, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 96,
                        "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": None},
                       dtype, device, impl)


def _padded(lengths, device, vocab: int = 96, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for b, n in enumerate(lengths):  # left padding, as batched generation pads
        ids[b, t - n:], mask[b, t - n:] = torch.randint(3, vocab, (n,), generator=g), 1
    return ids.to(device), mask.to(device)


def _random_routers(ms, seed: int, scale: float = 4.0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in ms.routers().values():
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * scale / r.weight.shape[1] ** 0.5)


def _mixed(decisions) -> bool:
    return any(d is not None and 0 < int(d.sum()) < d.numel() for d in decisions.values())


def check_skip_equals_mask(device, dtype, impl: str, level: str, tol: float) -> tuple[bool, str]:
    """Logits of execution "skip" and "mask" under the same mixed decisions, at real positions."""
    import torch

    from rt_lib.mindskip.config import MindSkipConfig
    from rt_lib.mindskip.model import get_mindskip_model

    model = _tiny_llama(device, dtype, impl)
    ids, mask = _padded([8, 5, 7], device)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3, 4], route_level=level))
    ms.eval()
    with torch.no_grad():
        for seed in range(10):
            _random_routers(ms, seed)
            skip = model(input_ids=ids, attention_mask=mask).logits
            keep = {i: d.clone() for i, d in ms.decisions().items()}
            if _mixed(keep):
                break
        if not _mixed(keep):
            return False, "no router seed gave mixed decisions"
        ms.set_execution("mask")
        masked = model(input_ids=ids, attention_mask=mask).logits
    if not all(torch.equal(keep[i], d) for i, d in ms.decisions().items()):
        return False, "the mask pass took other decisions"
    real = mask.bool()
    diff = float((skip[real].float() - masked[real].float()).abs().max())
    return diff <= tol, f"max |skip - mask| {diff:.2e} (tolerance {tol:.0e})"


def check_cached_equals_uncached(device, dtype, impl: str, level: str, tol: float) -> tuple[bool, str]:
    """Greedy ``generate`` (KV cache) against the whole sequence recomputed without a cache at
    every step: the logits of each step, and the greedy token each gives."""
    import torch

    from rt_lib.mindskip.config import MindSkipConfig
    from rt_lib.mindskip.model import get_mindskip_model

    model = _tiny_llama(device, dtype, impl)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[2, 3, 4], route_level=level))
    ms.eval()
    _random_routers(ms, 5)
    ids, mask = _padded([9, 5, 7], device, seed=2)
    steps, t = 6, ids.shape[1]
    with torch.no_grad():
        out = ms.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                          output_scores=True, return_dict_in_generate=True, pad_token_id=0)
        if level == "seq":  # the uncached recomputation replays the decisions taken at prefill
            ms.force({i: d.clone() for i, d in ms.decisions().items()})
        mixed = _mixed(ms.decisions())
        full_mask = torch.cat([mask, torch.ones(mask.shape[0], steps, dtype=mask.dtype, device=device)], 1)
        diff, same_tokens = 0.0, True
        for i in range(steps):
            m = full_mask[:, :t + i]
            pos = (m.cumsum(-1) - 1).clamp_min(0)
            lg = model(input_ids=out.sequences[:, :t + i], attention_mask=m, position_ids=pos,
                       use_cache=False).logits[:, -1]
            diff = max(diff, float((lg.float() - out.scores[i].float()).abs().max()))
            same_tokens &= bool(torch.equal(lg.argmax(-1), out.sequences[:, t + i]))
    note = "" if mixed else "; decisions were not mixed"
    if not same_tokens:
        return False, f"greedy tokens differ; max |cached - uncached| {diff:.2e}{note}"
    return diff <= tol, f"same greedy tokens, max |cached - uncached| {diff:.2e} (tolerance {tol:.0e}){note}"


def correctness_checks(device) -> list[dict]:
    """Every check for SDPA, and flash_attention_2 where flash_attn imports (CUDA only)."""
    import torch

    impls = ["sdpa"]
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            impls.append("flash_attention_2")
        except Exception:  # noqa: BLE001 - absent or broken: not checked
            pass
    checks = [("skip == mask", "seq", check_skip_equals_mask), ("skip == mask", "token", check_skip_equals_mask),
              ("cached == uncached", "token", check_cached_equals_uncached),
              ("cached == uncached", "seq", check_cached_equals_uncached)]
    rows = []
    for impl in impls:
        dtype = torch.float32 if impl == "sdpa" else torch.bfloat16
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        for title, level, fn in checks:
            name = f"{title} ({level} routing, {impl}, {str(dtype).replace('torch.', '')})"
            t0 = time.perf_counter()
            if level == "token" and impl not in ("sdpa", "eager"):
                status, detail = "n/a", "token routing needs eager or sdpa attention (rt_lib.mindskip.architecture)"
            else:
                try:
                    ok, detail = fn(device, dtype, impl, level, tol)
                    status = "pass" if ok else "fail"
                except Exception as exc:  # noqa: BLE001 - a check must not stop the timing
                    status, detail = "fail", f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            rows.append({"check": name, "status": status, "detail": detail,
                         "seconds": round(time.perf_counter() - t0, 2)})
            print(f"  {status:<4} {name}: {detail}", flush=True)
    return rows


# ============================================================================ the report
def claim_summary(rows: list[dict], num_layers: int, ks) -> list[dict]:
    """Per regime, at the k closest to the paper's fraction: the best measured MindSkip and
    oracle speedups, the bound there, and whether the paper's speedup is reached."""
    k = min(ks, key=lambda x: (abs(x / num_layers - CLAIM_SKIP), x))
    out = []
    for regime in ("prefill", "decode"):
        ok = [r for r in rows if r["regime"] == regime and r["status"] == "ok" and r["k"] == k]
        if not ok:
            continue
        ms = max((r for r in ok if r["variant"] == f"mindskip_{k}"), key=lambda r: r["speedup"])
        oracle = max((r for r in ok if r["variant"] == f"oracle_{k}"), key=lambda r: r["speedup"])
        where = f"batch {ms['batch']} x {ms['context']}"
        if ms["speedup"] >= CLAIM_SPEEDUP:
            verdict = f"reached by MindSkip ({where})"
        elif oracle["speedup"] >= CLAIM_SPEEDUP:
            verdict = f"reached by the oracle only (batch {oracle['batch']} x {oracle['context']})"
        elif ms["bound"] >= CLAIM_SPEEDUP:
            verdict = "within the bound only"
        else:
            verdict = "not reached"
        out.append({"regime": regime, "k": k, "skip_fraction": k / num_layers, "mindskip_speedup": ms["speedup"],
                    "mindskip_point": where, "oracle_speedup": oracle["speedup"],
                    "oracle_point": f"batch {oracle['batch']} x {oracle['context']}", "bound": ms["bound"],
                    "verdict": verdict})
    return out


def _f(x, fmt: str, none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def format_table(report: dict) -> str:
    v = report["versions"]
    lines = [f"GPU check on {v.get('device')}: torch {v['torch']} (CUDA {v.get('cuda')}), transformers "
             f"{v['transformers']}, python {v['python']}; {'DRY RUN (tiny shapes, CPU)' if report['dry_run'] else ''}"
             .rstrip("; "),
             f"model: {report['model']}; routed layers {report['routed_layers']}; "
             f"wall time {report.get('wall_s', 0):.0f} s (estimated {report['estimate']['total_s']:.0f} s)", "",
             f"{'regime':<8}{'batch':>6}{'ctx':>6}  {'variant':<12}{'median ms':>11}{'tokens/s':>13}{'speedup':>9}"
             f"{'bound':>8}{'KV MiB':>10}{'KV saved':>9}  status"]
    for r in report["rows"]:
        lines.append(f"{r['regime']:<8}{r['batch']:>6}{r['context']:>6}  {r['variant']:<12}"
                     f"{_f(r.get('median_ms'), '.3f'):>11}{_f(r.get('tokens_per_s'), ',.0f'):>13}"
                     f"{_f(r.get('speedup'), '.3f'):>9}{_f(r.get('bound'), '.3f'):>8}"
                     f"{_f(r['kv_bytes'] / 2**20 if r.get('kv_bytes') is not None else None, '.1f'):>10}"
                     f"{_f(100 * r['kv_saved'] if r.get('kv_saved') is not None else None, '.1f'):>8}%  "
                     f"{r['status']}{' (' + r['reason'] + ')' if r['status'] != 'ok' and r.get('reason') else ''}")
    lines += ["", "correctness:"]
    lines += [f"  {c['status']:<4} {c['check']}: {c['detail']}" for c in report["checks"]]
    lines += ["", f"claim: {CLAIM_SPEEDUP}x at ~{CLAIM_SKIP:.0%} of attention layers skipped"]
    for c in report["claim"]:
        lines.append(f"  {c['regime']:<8} k={c['k']} ({c['skip_fraction']:.0%}): best MindSkip {c['mindskip_speedup']:.3f}x "
                     f"({c['mindskip_point']}), oracle {c['oracle_speedup']:.3f}x ({c['oracle_point']}), bound there "
                     f"{c['bound']:.3f}x -> {c['verdict']}")
    if not report["claim"]:
        lines.append("  no point measured")
    return "\n".join(lines)


def write_outputs(out: Path, report: dict) -> None:
    """gpu_check.csv, gpu_check.json and summary.txt, each replaced whole."""
    out.mkdir(parents=True, exist_ok=True)

    def replace(name, text):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)

    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS + ["detail"], extrasaction="ignore")
    w.writeheader()
    for r in report["rows"]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in FIELDS})
    for c in report["checks"]:
        w.writerow({"regime": "check", "variant": c["check"], "status": c["status"], "detail": c["detail"]})
    replace("gpu_check.csv", buf.getvalue())
    replace("gpu_check.json", json.dumps(_finite(report), indent=1) + "\n")
    replace("summary.txt", format_table(report) + "\n")


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ============================================================================ the check
def run_check(s: Settings, out: Path) -> dict:
    """Correctness checks, then every point; the report is written after each point."""
    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    vers = require_stack()
    import torch
    import transformers

    if s.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible; this check is meant for a GPU "
                         "(--dry-run runs the same code on a CPU with tiny shapes)")
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _run(s, out, vers, t_start)
    finally:  # the caller's settings back (the tests run the dry run in their own process)
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)


def _run(s: Settings, out: Path, vers: dict, t_start: float) -> dict:
    import torch

    device = torch.device(s.device)
    dtype = getattr(torch, s.dtype)
    dtype_bytes = torch.finfo(dtype).bits // 8
    config = read_config(s.model_overrides)
    shape = _shape_class().from_dict(config)
    s, notes = fit_budget(shape, s)
    est = estimate(shape, s)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items() if k != "transformers_path"), flush=True)
    print(f"transformers from {vers['transformers_path']}", flush=True)
    print(f"model: Llama {shape.layers} layers, hidden {shape.hidden}, {shape.params / 1e9:.2f} B parameters, "
          f"{s.dtype}; points {len(points(s))}, variants {variant_names(s.ks)}", flush=True)
    print(format_estimate(est), flush=True)
    for n in notes:
        print(f"  budget {s.budget_s:.0f} s: {n}", flush=True)
    source = f"{CONFIG.relative_to(ROOT)}" + (f" with {json.dumps(s.model_overrides)}" if s.model_overrides else "")
    report: dict[str, Any] = {
        "dry_run": s.dry_run, "settings": dataclasses.asdict(s), "versions": vers, "budget_notes": notes,
        "model": f"Llama ({source}), {shape.params:,} parameters, random {s.dtype} weights, sdpa",
        "routed_layers": f"{routed_layers(shape.layers)[0]}..{routed_layers(shape.layers)[-1]}",
        "skipped_layers": {k: skipped_layers(shape.layers, k) for k in s.ks},
        "estimate": est, "rows": [], "checks": [], "claim": [],
        "protocol": {"timing": "cuda events" if device.type == "cuda" else "perf_counter wall clock",
                     "prefill": f"{s.warmup} warm-up + {s.repeats} timed rounds, variants interleaved ABC CBA",
                     "decode": f"{s.decode_rounds} rounds x ({s.decode_warmup} warm-up + {s.decode_steps} timed "
                               "steps) from a 1-row prefill expanded with reorder_cache",
                     "bound": f"dense with attention hooks: {s.bound_rounds} prefill forwards / {s.bound_steps} "
                              "decode steps"}}

    print("correctness checks (tiny Llama):", flush=True)
    report["checks"] = correctness_checks(device)
    write_outputs(out, report)

    from rt_lib.mindskip.config import MindSkipConfig
    from rt_lib.mindskip.model import get_mindskip_model

    free = free_memory(device)
    weights = shape.params * dtype_bytes
    if free is not None and weights > s.memory_headroom * free:
        raise SystemExit(f"error: the model needs {weights / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free")
    t0 = time.perf_counter()
    torch.manual_seed(s.seed)
    model = build_model(config, dtype, device)
    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=routed_layers(shape.layers)))
    ms.eval()
    variants = make_variants(ms, s.ks, shape.layers)
    if device.type == "cuda":
        torch.cuda.synchronize()
    report["build_s"] = round(time.perf_counter() - t0, 2)
    print(f"model built in {report['build_s']:.1f} s; timing {len(points(s))} points x {len(variants)} variants",
          flush=True)
    for regime, batch, length in points(s):
        t0 = time.perf_counter()
        rows = run_point(variants, regime, batch, length, s, shape, device, dtype_bytes)
        report["rows"] += rows
        r0 = rows[0]
        brief = ", ".join(f"{r['variant']} {r['speedup']:.2f}x" for r in rows[1:] if r["status"] == "ok"
                          and r["variant"].startswith(("oracle", "mindskip")))
        state = (f"dense {r0['median_ms']:.2f} ms; {brief}" if r0["status"] == "ok"
                 else f"{r0['status']}: {r0['reason']}")
        print(f"  {regime:<8} batch {batch:>3} x {length:>5}: {state} ({time.perf_counter() - t0:.1f} s)", flush=True)
        report["claim"] = claim_summary(report["rows"], shape.layers, s.ks)
        report["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_outputs(out, report)
    ms.unload()
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_outputs(out, report)
    return report


# ============================================================================ --prepare
def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of what travels from the working tree: tracked files and untracked ones git does
    not ignore (files present on disk; links count as links)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            check=True, capture_output=True).stdout.split(b"\0")
    total = 0
    for name in {n for n in listed if n}:
        try:
            total += os.lstat(root / os.fsdecode(name)).st_size
        except FileNotFoundError:  # deleted in the working tree: does not travel
            pass
    return total


def wheel_sizes(folder: Path) -> dict[str, int]:
    """The wheels in ``folder`` and their sizes in bytes."""
    return {p.name: p.stat().st_size for p in sorted(Path(folder).glob("*.whl"))}


def carry_budget(wheels: dict[str, int], tree: int, limit: int = LIMIT_BYTES) -> dict:
    """What travels (working tree + carried wheels) against ``limit``: totals and whether it fits."""
    carried = sum(wheels.values())
    total = tree + carried
    return {"wheels": dict(wheels), "wheel_bytes": carried, "tree_bytes": tree, "total_bytes": total,
            "limit_bytes": limit, "fits": total <= limit, "room_bytes": limit - total}


def run_command(with_wheels: bool) -> str:
    """The one line to run on the GPU machine, in the repository root."""
    check = "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu-check"
    if with_wheels:
        return f"{INSTALL_WHEELS} && export PYTHONPATH=/tmp/site:. && {check}"
    return f"export PYTHONPATH=. && {check}"


def _mb(n: int) -> str:
    return f"{n:>12,} bytes ({n / 2**20:6.2f} MiB)"


def prepare(pinned_transformers: bool = False, whl_dir: Path = WHEEL_DIR, python: str = sys.executable,
            tree: int | None = None) -> int:
    """Fill ``whl_dir`` with the wheels to carry (by default none: see the module docstring),
    print the size accounting and write the command to run there. 0 when it fits, else 1."""
    whl_dir = Path(whl_dir)
    whl_dir.mkdir(parents=True, exist_ok=True)
    for old in whl_dir.glob("*.whl"):  # a stale wheel would travel and be installed
        old.unlink()
    wanted = [f"transformers=={PINNED_TRANSFORMERS}"] if pinned_transformers else []
    for spec in wanted:
        cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *PIP_PLATFORM, "-d",
               str(whl_dir), spec]
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            print(f"error: pip could not download {spec} (PyPI reachable?)", file=sys.stderr)
            return 1
    budget = carry_budget(wheel_sizes(whl_dir), tree_bytes() if tree is None else tree)
    print("wheels carried in .whl/:" if budget["wheels"] else
          "wheels carried: none (the GPU machine's transformers runs the check; "
          "--pinned-transformers carries transformers " + PINNED_TRANSFORMERS + ")")
    for name, size in budget["wheels"].items():
        print(f"  {name:<48} {_mb(size)}")
    print(f"  {'wheels':<48} {_mb(budget['wheel_bytes'])}")
    print(f"  {'working tree (tracked + untracked, not ignored)':<48} {_mb(budget['tree_bytes'])}")
    print(f"  {'total':<48} {_mb(budget['total_bytes'])}")
    room = budget["room_bytes"] / 2**20
    print(f"  fits the {LIMIT_BYTES / 2**20:.0f} MiB limit ({room:.2f} MiB to spare)" if budget["fits"] else
          f"  does NOT fit the {LIMIT_BYTES / 2**20:.0f} MiB limit (over by {-room:.2f} MiB)")
    cmd_file = whl_dir / RUN_COMMAND_FILE
    if not budget["fits"]:
        cmd_file.unlink(missing_ok=True)
        for wheel in whl_dir.glob("*.whl"):  # nothing over the limit is left to travel or be installed
            wheel.unlink()
        why = ("the working tree alone is over the limit: make it smaller (untracked files count unless ignored)"
               if budget["tree_bytes"] > budget["limit_bytes"] else
               "carry fewer wheels (drop --pinned-transformers) or make the working tree smaller")
        print(f"error: what travels is over the limit; {why}. The wheels were removed from {whl_dir}.",
              file=sys.stderr)
        return 1
    line = run_command(bool(budget["wheels"]))
    cmd_file.write_text(line + "\n")
    print(f"run on the GPU machine, in the repository root{' (carry .whl)' if budget['wheels'] else ''} "
          f"(also in {cmd_file.relative_to(ROOT) if cmd_file.is_relative_to(ROOT) else cmd_file}):")
    print(f"  {line}")
    return 0


# ============================================================================ entry
def settings_from(a: argparse.Namespace) -> Settings:
    s = DRY_RUN if a.dry_run else GPU
    over = {k: getattr(a, k) for k in ("warmup", "repeats", "decode_rounds", "decode_steps", "budget_s")
            if getattr(a, k) is not None}
    if a.ks:
        over["ks"] = tuple(int(x) for x in a.ks.split(","))
    return dataclasses.replace(s, **over)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-check-out", help="output folder (default gpu-check-out)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: the same code path")
    ap.add_argument("--estimate", action="store_true", help="print the plan and its time estimate, run nothing")
    ap.add_argument("--prepare", action="store_true", help="here: the wheels to carry, the size accounting and "
                                                           "the command to run there (.whl/RUN_COMMAND.txt)")
    ap.add_argument("--pinned-transformers", action="store_true",
                    help=f"with --prepare: carry transformers {PINNED_TRANSFORMERS} (13.5 MB)")
    ap.add_argument("--ks", default=None, help="comma list of skipped attention layers counts (default 4,8)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--decode-rounds", type=int, default=None)
    ap.add_argument("--decode-steps", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds the whole check may take by the estimate; repeats are lowered to fit (default 420)")
    a = ap.parse_args(argv)
    if a.prepare:
        return prepare(pinned_transformers=a.pinned_transformers)
    s = settings_from(a)
    if a.estimate:
        shape = _shape_class().from_dict(read_config(s.model_overrides))
        s, notes = fit_budget(shape, s)
        print(format_estimate(estimate(shape, s)))
        for n in notes:
            print(f"  budget {s.budget_s:.0f} s: {n}")
        return 0
    report = run_check(s, Path(a.out))
    print()
    print(format_table(report), flush=True)
    print(f"\nwritten: {Path(a.out) / 'gpu_check.csv'}, gpu_check.json, summary.txt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

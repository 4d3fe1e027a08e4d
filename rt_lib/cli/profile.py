"""The profiling command line, ``python -m rt_lib profile`` (what is measured:
``rt_lib.speed.profiling``; the step it runs: ``rt_lib.speed.step``)."""

from __future__ import annotations

import argparse

import torch

from rt_lib.cli.flags import add_deprecated_alias
from rt_lib.mindskip.config import GRANULARITIES
from rt_lib.speed import profiling
from rt_lib.speed.variants import VARIANTS


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()] if text else None


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rt_lib profile", description=profiling.__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="quick", choices=list(profiling.PROFILE_GRIDS),
                   help="the points measured and how often (rt_lib.speed.profiling.PROFILE_GRIDS)")
    add_deprecated_alias(p, "--preset", "--grid", choices=list(profiling.PROFILE_GRIDS))
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--routers", default=None, help="router checkpoint folder; default: fresh (zero-init) routers")
    p.add_argument("--out", required=True, help="run folder; results go to <out>/profile/")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA and on CPUs with native bf16 matrix "
                   "products, else float32) | float32 | bfloat16 | float16")
    p.add_argument("--device", default=None, help="default: cuda if available else cpu")
    p.add_argument("--skip-layers", type=_ints, default=None, help="comma list of routed layers whose gated sublayers (attention, MLP, sparse MoE blocks or "
                        "whole layers, as the routers gate) are force-skipped, removed and masked")
    p.add_argument("--skip-k", type=int, default=None, help="number of layers to force-skip (chosen by the routers)")
    p.add_argument("--static-layers", type=_ints, default=None, help="comma list of layers whose attention static_drop "
                   "removes (default: chosen by rt_lib.tuning.baselines; none for moe routers, which skip no attention)")
    p.add_argument("--variants", default=None, help=f"comma list from {','.join(VARIANTS)}")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--num-routed-layers", type=int, default=None,
                   help="fresh routers only: route the n deepest layers except the last (default 16)")
    p.add_argument("--granularity", default=None, choices=GRANULARITIES,
                   help="fresh routers only: the sublayer they gate (default attn; moe: the sparse MoE blocks of "
                        "an MoE model)")
    p.add_argument("--text", default="wikipedia-en",
                   help="data set (rt_lib.assets.loading.load_dataset, column `text`) the prompts are cut from; "
                        "'none': random token ids")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.routers and a.granularity:
        p.error("--granularity is for fresh routers; a router checkpoint (--routers) records its own")

    given = {"skip_layers": a.skip_layers, "skip_k": a.skip_k, "static_layers": a.static_layers,
             "threshold": a.threshold, "repeats": a.repeats, "warmup": a.warmup, "threads": a.threads}
    overrides = {k: v for k, v in given.items() if v is not None}
    if a.variants:
        overrides["variants"] = a.variants.split(",")
    settings = profiling.grid(a.grid, **overrides)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from rt_lib.assets.loading import resolve_dtype

    dtype = resolve_dtype(a.dtype or "auto", device)

    import pandas as pd

    from rt_lib.assets.loading import load_model
    from rt_lib.mindskip.config import MindSkipConfig

    model, tokenizer = load_model(a.model, dtype=dtype, device=device, attn_implementation="sdpa")
    fresh_options = {"num_routed_layers": a.num_routed_layers, "granularity": a.granularity}
    fresh = MindSkipConfig(**{k: v for k, v in fresh_options.items() if v is not None})
    from rt_lib.speed.step import run_step

    rows, _, prof = run_step(model, tokenizer, a.out, settings, routers=a.routers, config=fresh,
                             text=None if a.text.lower() == "none" else a.text, grid_name=a.grid,
                             model_name=a.model, progress=not a.no_progress)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        print(pd.DataFrame(rows)[["regime", "variant", "batch_size", "seq_len", "median_ms", "p10_ms", "p90_ms",
                                  "skip_ratio", "kv_bytes", "speedup", "bound_speedup", "status"]].to_string(index=False))
        print()
        print(profiling.summarize(rows).to_string(index=False))
    print(f"\nwrote {prof}")
    return 0


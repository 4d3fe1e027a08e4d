"""Smoke-scale MindSkip run on a tiny random OLMoE-family model, all steps in one run folder:
Router-Tuning of `moe` routers, the expert load assigned vs executed on held-out text, and the
profiler's variants.

    python benchmarks/moe_smoke.py [--out results/runs/moe-smoke-olmoe] [--steps 16] [--threads 1]

The model is built here, nothing is downloaded: an OLMoE config with 4 layers, hidden 64, 4
attention heads, 8 experts of width 128, top-2, the kit's byte tokenizer
(`rt_lib.tuning.data.byte_tokenizer`, 259 ids), random weights (seed 0). What it writes:
- `train/`: Router-Tuning (`rt_lib.tuning.train`, the `smoke` training recipe: packed
  64-token blocks of wikipedia-en; lr 1e-2, lambda 0.1, target capacity 0.5) of token-level
  routers on the sparse MoE blocks of layers 1 and 2, `--steps` optimiser steps. The routers
  start at score 0.9 (`router_init`), every block kept, and move down to mixed decisions; from
  zero-initialised routers the first optimiser step flips every decision at once, and the
  expert load would show nearly nothing executed;
- `moe/`: `expert_load.csv` and `expert_load.png` (`rt_lib.speed.moe_load`) over `--batches`
  batches of 8 x 64 tokens cut from the wikipedia-en validation split (not tuned on);
- `profile/`: the profiler (`rt_lib.speed.step.run_step`) on its `smoke` grid (prefill 1-2 x 8
  tokens, decode 1-2 sequences x 8 context + 3 tokens) with the routed layer the routers skip
  most forced off (`skip_k=1`): dense, mindskip, mindskip_forced, oracle, mask. static_drop
  is left out: it drops attention, which `moe` routers never skip (profile.json `omitted`).

The routers and experts of a random model learn nothing about text: the numbers show that every
path runs and what each column holds, nothing about real MoE models. A second run needs a new
`--out` (or the old folder removed): a run folder is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MODEL_NAME = "tiny-random-olmoe"
SIZES = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512)
BATCH, LENGTH = 8, 64  # held-out expert-load batches: sequences x tokens


def tiny_olmoe(vocab_size: int, seed: int = 0):
    """A random OLMoE-family model of ``SIZES`` for a tokenizer of ``vocab_size`` ids
    (``<s>``, ``</s>``, ``<pad>`` = 0, 1, 2, as the byte tokenizer numbers them)."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=2, **SIZES)
    cfg._attn_implementation = "sdpa"
    cfg.rt_kit_name = MODEL_NAME  # the name run.json and the router checkpoint record
    torch.manual_seed(seed)
    return OlmoeForCausalLM(cfg).eval()


def heldout_batches(tokens: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``n`` consecutive (BATCH, LENGTH) windows of the 1-D ``tokens``, all real tokens."""
    need = n * BATCH * LENGTH
    if tokens.numel() < need:
        raise ValueError(f"the held-out text has {tokens.numel()} tokens; {n} batches need {need}")
    return list(tokens[:need].view(n, BATCH, LENGTH))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/runs/moe-smoke-olmoe", help="run folder to create")
    ap.add_argument("--steps", type=int, default=16, help="Router-Tuning optimiser steps")
    ap.add_argument("--batches", type=int, default=4, help=f"held-out batches of {BATCH} x {LENGTH} tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (training and timing)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        ap.error(f"{out} already holds files: remove it or pass another --out")
    torch.set_num_threads(a.threads)

    import pandas as pd

    from rt_lib.mindskip.model import MindSkipModel
    from rt_lib.speed import moe_load, profiling
    from rt_lib.speed.step import run_step, text_tokens
    from rt_lib.tuning.data import byte_tokenizer
    from rt_lib.tuning.train import train_routers

    t0 = time.perf_counter()
    tok = byte_tokenizer()
    model = tiny_olmoe(len(tok))

    # 1. Router-Tuning of the MoE blocks of layers 1 and 2 (train/)
    res = train_routers("smoke", model=model, tokenizer=tok, out=str(out), granularity="moe", route_level="token",
                        num_routed_layers=2, router_init=0.9, max_steps=a.steps, threads=a.threads, progress=False)
    res.ms.unload()
    routers = out / "train" / "routers"
    t_train = time.perf_counter() - t0

    # 2. expert load on held-out text (moe/)
    tokens = text_tokens(tok, "wikipedia-en")  # the validation split
    batches = heldout_batches(tokens, a.batches)
    ms = MindSkipModel.from_pretrained(model, routers)
    ms.eval()
    try:
        rows = moe_load.expert_load(ms, batches)
        threshold = ms.config.threshold
    finally:
        ms.unload()
    moe_load.record_step(out, rows, {"model": MODEL_NAME, "routers": "train/routers", "text": "wikipedia-en",
                                     "split": "validation", "batches": a.batches, "batch_size": BATCH,
                                     "seq_len": LENGTH, "threshold": threshold},
                         title=f"{MODEL_NAME}: expert load, routed MoE layers (random weights)")
    t_load = time.perf_counter() - t0 - t_train

    # 3. the profiler's variants on the smoke grid (profile/)
    settings = profiling.grid("smoke", skip_k=1, threads=a.threads)
    prof_rows, cond, _ = run_step(model, tok, out, settings, routers=str(routers), text="wikipedia-en",
                                  grid_name="smoke", model_name=MODEL_NAME, progress=False)
    t_prof = time.perf_counter() - t0 - t_train - t_load

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        summary = res.summary
        print(f"Router-Tuning: {summary['steps']} steps, held-out capacity {summary['final_capacity']}, "
              f"held-out LM loss {summary['heldout_lm_loss']}")
        print("\nexpert load per layer (moe/expert_load.csv, summed over experts):")
        print(pd.DataFrame(moe_load.summarise(rows)).to_string(index=False))
        per = pd.DataFrame(rows)
        print("\nexpert load per expert, summed over the routed layers:")
        print(per[per.routed].groupby("expert")[["assigned", "routed_assigned", "executed"]].sum().T.to_string())
        print(f"\nprofile (profile/profile.csv; skip_layers {cond['skip_layers']}, omitted {list(cond['omitted'])}):")
        print(pd.DataFrame(prof_rows)[["regime", "variant", "batch_size", "seq_len", "median_ms", "skip_ratio",
                                       "kv_bytes", "speedup", "bound_speedup", "roofline_speedup",
                                       "status"]].to_string(index=False))
        print()
        print(profiling.summarize(prof_rows).to_string(index=False))
    print(f"\nwrote {out} in {time.perf_counter() - t0:.0f} s (train {t_train:.0f} s, expert load {t_load:.0f} s, "
          f"profile {t_prof:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end generation speed, what users call: ``generate()`` of dense vs MindSkip.

Times whole greedy ``generate`` calls (prefill + ``--new-tokens`` tokens, end-of-sequence
ignored so every call makes the same number of tokens) of the base model and of the MindSkip
model with its routers, interleaved in alternating order (A B, B A, ...) on the same weights;
prompts are consecutive windows of the embedded Wikipedia text. Prints, per (batch, prompt
length), the median wall time, generated tokens/s and the ratio dense / MindSkip measured in the
same run, beside the routers' realised skip ratio. Writes a CSV with ``--out``.

    python benchmarks/generate_speed.py --routers results/runs/cpu-main/train/routers \\
        --points 1x128,8x1024 --new-tokens 32 --repeats 3 [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rt_lib.assets.loading import load_model  # noqa: E402
from rt_lib.runs.checkpoints import attach_routers  # noqa: E402
from rt_lib.speed.timing import grid_tokens, interleave, timed_ms  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--routers", required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--points", default="1x128,8x1024", help="comma list of BATCHxPROMPT_TOKENS")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    base, tok = load_model(a.model, dtype=a.dtype)
    from rt_lib.speed.step import text_tokens

    tokens = text_tokens(tok, "wikipedia-en")
    ms = attach_routers(base, a.routers)
    ms.eval()
    device = torch.device("cpu")
    rows = []
    for point in a.points.split(","):
        batch, length = (int(x) for x in point.lower().split("x"))
        ids = grid_tokens(batch, length, base.config.vocab_size, 0, tokens)
        kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=tok.eos_token_id)
        skip = []

        def run_once(name):
            with torch.inference_mode():
                if name == "dense":
                    with ms.detached() as plain:
                        return timed_ms(lambda: plain.generate(input_ids=ids, **kw), device)
                ms.reset_stats()
                t = timed_ms(lambda: ms.generate(input_ids=ids, **kw), device)
                skip.append(ms.skip_ratio())
                return t

        out = interleave(["dense", "mindskip"], run_once, warmup=1, repeats=a.repeats)
        med = {k: statistics.median(v) for k, v in out.items()}
        n = batch * a.new_tokens
        row = {"batch": batch, "prompt": length, "new_tokens": a.new_tokens, "dense_ms": med["dense"],
               "mindskip_ms": med["mindskip"], "dense_tok_s": n * 1e3 / med["dense"],
               "mindskip_tok_s": n * 1e3 / med["mindskip"], "speedup": med["dense"] / med["mindskip"],
               "skip_ratio": statistics.mean(skip), "repeats": a.repeats}
        rows.append(row)
        print(f"{batch:>3} x {length:>5} + {a.new_tokens} new: dense {med['dense'] / 1e3:7.2f} s "
              f"({row['dense_tok_s']:6.1f} tok/s), MindSkip {med['mindskip'] / 1e3:7.2f} s "
              f"({row['mindskip_tok_s']:6.1f} tok/s): {row['speedup']:.3f}x at skip {row['skip_ratio']:.2f}",
              flush=True)
    if a.out:
        import pandas as pd

        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_csv(a.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

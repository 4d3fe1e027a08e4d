"""What the profiler's untimed prefill gains from every usable core.

    python benchmarks/prefill_threads.py [--batch 8] [--context 1024] [--dtype auto] [--rounds 2]

The profiler times decode steps with the grid's thread count (one on the `quick` grid) but
prefills each decode context, which nobody times, with every usable core
(`rt_lib.speed.timing.prefill`). This prints the prefill time of one `batch x context`
prompt of the embedded model at one thread and at every usable core, interleaved over
`rounds`, and their ratio: the share of the profiling step that long contexts no longer cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rt_lib.assets.loading import load_model, resolve_dtype  # noqa: E402
from rt_lib.speed.step import text_tokens  # noqa: E402
from rt_lib.speed.timing import forward_step, grid_tokens, new_cache  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args(argv)
    device = torch.device("cpu")
    model, tok = load_model(a.model, dtype=resolve_dtype(a.dtype, device), device=device)
    ids = grid_tokens(a.batch, a.context, model.config.vocab_size, 0, text_tokens(tok, "wikipedia-en"))
    cores = len(os.sched_getaffinity(0))
    times: dict[int, list[float]] = {1: [], cores: []}
    with torch.inference_mode():
        for r in range(a.rounds + 1):  # round 0 warms up
            for n in (times if r % 2 else reversed(list(times))):
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                forward_step(model, ids, new_cache(model), 0)
                if r:
                    times[n].append(time.perf_counter() - t0)
    one, many = statistics.median(times[1]), statistics.median(times[cores])
    print(f"prefill {a.batch} x {a.context} ({next(model.parameters()).dtype}), median of {a.rounds}: "
          f"1 thread {one:.2f} s, {cores} threads {many:.2f} s, ratio {one / many:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where token routing's time goes: routing work around the attention vs the attention itself.

    python benchmarks/token_routing_cost.py [--routers DIR] [--points prefill:1x128,prefill:4x128,decode:1x128]
                                            [--rounds 5] [--dtype auto] [--threads 1]

Token routing (`route_level: token`) runs a routed attention sublayer on the kept tokens of each
row only: the gate gathers them, builds the attention mask of the compacted keys (a skipped
token is never a key at that layer), calls the attention, and scatters the result back. This
times, with forward hooks, per grid point and interleaved with the dense model over `rounds`:
- the whole forward (prefill) or decode step, dense and token-routed, and their ratio;
- summed over the routed layers: the dense model's attention time; the token gates' time,
  split into the attention call on the kept tokens and the gate's own work (gather, mask,
  scatter, history: gate minus attention);
- the kept-token fraction, and what the routed attention would cost if its time scaled with the
  kept tokens (dense attention x kept fraction), beside what it costs.
Nothing is asserted: read the ratios of one run (the machine is shared).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rt_lib.assets.loading import load_model, resolve_dtype  # noqa: E402
from rt_lib.mindskip.model import MindSkipModel  # noqa: E402
from rt_lib.speed.step import text_tokens  # noqa: E402
from rt_lib.speed.timing import forward_step, grid_tokens, new_cache  # noqa: E402

ROUTERS = "results/runs/sweep-cpu-granularity=attn-route_level=token/train/routers"


class Clock:
    """Sums the time spent inside modules (forward pre/post hooks), by name."""

    def __init__(self):
        self.acc: dict[str, float] = {}
        self.started: dict[int, float] = {}
        self.handles = []

    def watch(self, module, name: str) -> None:
        def pre(mod, *_):
            self.started[id(mod)] = time.perf_counter()

        def post(mod, *_):
            self.acc[name] = self.acc.get(name, 0.0) + (time.perf_counter() - self.started.pop(id(mod))) * 1e3
        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def take(self) -> dict[str, float]:
        out, self.acc = self.acc, {}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--routers", default=ROUTERS)
    p.add_argument("--points", default="prefill:1x128,prefill:4x128,decode:1x128,decode:1x1024")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    model, tok = load_model(a.model, dtype=resolve_dtype(a.dtype, device), device=device, attn_implementation="sdpa")
    ms = MindSkipModel.from_pretrained(model, a.routers)
    ms.eval()
    if ms.config.route_level != "token" or ms.config.granularity != "attn":
        sys.exit(f"{a.routers}: routers of {ms.config.granularity}/{ms.config.route_level}; need attn/token")
    text = text_tokens(tok, "wikipedia-en")
    print(f"{a.routers}: {len(ms.routed_layers)} routed layers, threshold {ms.config.threshold}, "
          f"{next(model.parameters()).dtype}, {a.threads} thread(s)")
    print(f"{'point':<16}{'dense ms':>10}{'token ms':>10}{'speedup':>9}{'kept':>7}{'attn dense':>12}"
          f"{'attn kept':>11}{'x kept':>8}{'gate work':>11}")
    for point in a.points.split(","):
        regime, shape = point.split(":")
        batch, length = (int(x) for x in shape.split("x"))
        ids = grid_tokens(batch, length + a.new_tokens, model.config.vocab_size, 0, text)
        prompt, steps = ids[:, :length], ids[:, length:]
        res = {"dense": [], "token": []}
        for r in range(a.rounds + 1):  # round 0 warms up
            for name in (("dense", "token") if r % 2 else ("token", "dense")):
                clock = Clock()
                if name == "dense":
                    ctx = ms.detached()
                    model_ = ctx.__enter__()
                    for i in ms.routed_layers:
                        clock.watch(ms.gates[i].base_layer, "attn")
                else:
                    ctx, model_ = None, ms.model
                    for i, g in ms.gates.items():
                        clock.watch(g, "gate")
                        clock.watch(g.base_layer, "attn")
                try:
                    with torch.inference_mode():
                        ms.reset_stats()
                        if regime == "prefill":
                            clock.take()
                            t0 = time.perf_counter()
                            forward_step(model_, prompt, new_cache(model_), 0)
                            total, units = (time.perf_counter() - t0) * 1e3, 1
                        else:
                            cache = new_cache(model_)  # a fresh context per round (untimed)
                            forward_step(model_, prompt, cache, 0)
                            ms.reset_stats()
                            clock.take()
                            t0 = time.perf_counter()
                            for i in range(a.new_tokens):
                                forward_step(model_, steps[:, i:i + 1], cache, length + i)
                            total, units = (time.perf_counter() - t0) * 1e3, a.new_tokens
                        parts = clock.take()
                        kept = 1.0 - ms.skip_ratio() if name == "token" else 1.0
                finally:
                    clock.close()
                    if ctx is not None:
                        ctx.__exit__(None, None, None)
                if r:
                    res[name].append({"total": total / units, "kept": kept,
                                      **{k: v / units for k, v in parts.items()}})
        med = {n: {k: statistics.median(x[k] for x in rows) for k in rows[0]} for n, rows in res.items()}
        d, t = med["dense"], med["token"]
        print(f"{point:<16}{d['total']:>10.1f}{t['total']:>10.1f}{d['total'] / t['total']:>8.3f}x{t['kept']:>7.2f}"
              f"{d['attn']:>12.1f}{t['attn']:>11.1f}{t['attn'] / (d['attn'] * t['kept']):>7.2f}x"
              f"{t['gate'] - t['attn']:>11.1f}")
    print("\nms per forward (prefill) or per decode step; attn: summed over routed layers; "
          "x kept: routed attention / (dense attention x kept fraction); gate work: gate minus its attention")
    return 0


if __name__ == "__main__":
    sys.exit(main())

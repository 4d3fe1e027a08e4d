"""How batching erodes MindSkip's decode savings under sequence routing, and what decision-aware
batching wins back.

Not a test. On the embedded SmolLM2-135M-Instruct with a router checkpoint, prompts cut from
consecutive windows of the embedded Wikipedia text:

1. decode, per batch size (default 1, 2, 4, 8, 16) at a long context (default 1024 tokens):
   ms per decode step of `dense` (the base model on the same weights), `mindskip` (the routers
   decide per request) and `uniform` (every row force-skips the same k routed layers, k the
   nearest whole number to MindSkip's mean per-row skip ratio times the routed layers; the
   layers MindSkip skips most often on these prompts), timed in interleaved rounds (prefill
   untimed); speedups are medians of per-round ratios. With each: the batch agreement, the
   fraction of routed layers the whole batch skips and the mean per-row skip ratio.
2. generation at equal total work: N requests of different prompt lengths, T new tokens each
   (greedy, exactly T), as plain batches of B consecutive requests and as decision-aware batches
   of at most B (`rt_lib.speed.batching.generate_grouped`, policies `pattern` and `cluster`), wall
   time per round (prefill included), tokens/s, and whether the token ids equal plain batching.

Writes batching.csv (part 1), batching.json (conditions, both parts) and batching.png
(speedup against batch size, and agreement) into --out.

    python benchmarks/batching.py --out results/runs/<id>/batching
    python benchmarks/batching.py --smoke --out /tmp/batching-smoke     # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rt_lib.speed import batching as bt  # noqa: E402
from rt_lib.speed.timing import forward_step, interleave, new_cache, timed_ms  # noqa: E402

DEFAULT_ROUTERS = Path(__file__).resolve().parents[1] / "results" / "runs" / "cpu-main" / "train" / "routers"
DECODE_VARIANTS = ("dense", "mindskip", "uniform")
GEN_PLANS = ("plain", "pattern", "cluster")
CSV_COLUMNS = ("batch_size", "context", "variant", "median_ms", "p10_ms", "p90_ms", "tokens_per_s", "speedup",
               "speedup_p10", "speedup_p90", "row_skip_ratio", "batch_skip_ratio", "batch_agreement",
               "skipped_layers", "n_patterns")
SMOKE = dict(model="tiny-random-llama", dtype="float32", batch_sizes=[1, 2, 4], context=48, steps=3, repeats=2,
             warmup=1, requests=6, new_tokens=4, gen_context=24, gen_batch=2, gen_repeats=1, gen_warmup=0)


# ---------------------------------------------------------------------------- model and prompts
def load(args):
    """(MindSkipModel in eval mode, tokenizer, router record)."""
    from rt_lib.assets.loading import load_model
    from rt_lib.runs.checkpoints import attach_routers

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    if not args.smoke:
        ms = attach_routers(model, args.routers)
        ms.eval()
        return ms, tok, {"path": str(args.routers), "weights_sha256": _sha(args.routers)}
    from rt_lib.mindskip.config import MindSkipConfig
    from rt_lib.mindskip.model import get_mindskip_model

    ms = get_mindskip_model(model, MindSkipConfig(routed_layers=[1, 2]))
    ms.eval()
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for r in ms.routers().values():  # random directions: decisions differ between prompts
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 8.0 / r.weight.shape[1] ** 0.5)
    return ms, tok, {"path": None, "note": "smoke: random router weights"}


def _sha(path):
    from rt_lib.mindskip.checkpoint import read_checkpoint_metadata

    return read_checkpoint_metadata(path).get("weights_sha256")


def windows(tokens: torch.Tensor, rows: int, length: int, offset: int = 0) -> torch.Tensor:
    """(rows, length) consecutive non-overlapping windows of the 1-D text `tokens` (wrapping)."""
    idx = offset + torch.arange(rows)[:, None] * length + torch.arange(length)[None, :]
    return tokens[idx % tokens.numel()]


def padded_requests(tokens, n: int, context: int, pad: int, seed: int):
    """n left-padded prompts of lengths between context/2 and context, cut from the text after
    the windows of part 1 (offset) so the two parts read different text."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(context // 2, 1), context + 1, (n,), generator=g)
    text = windows(tokens, n, context, offset=tokens.numel() // 2)
    ids = torch.full((n, context), pad, dtype=torch.long)
    mask = torch.zeros(n, context, dtype=torch.long)
    for b, n_b in enumerate(lengths.tolist()):
        ids[b, context - n_b:], mask[b, context - n_b:] = text[b, :n_b], 1
    return ids, mask


# ---------------------------------------------------------------------------- part 1: decode
def most_skipped(keep: torch.Tensor, routed: list[int], k: int) -> list[int]:
    """The k routed layers skipped by most rows of `keep` (ties: deeper first)."""
    skipped = (~keep).float().mean(0)
    ranked = sorted(range(len(routed)), key=lambda j: (-float(skipped[j]), -routed[j]))
    return sorted(routed[j] for j in ranked[:k])


def decode_point(ms, ids, context, keep, args):
    """Interleaved decode timing of dense / mindskip / uniform on one batch; returns CSV rows."""
    from rt_lib.speed.variants import build_variants

    routed = list(ms.routed_layers)
    k = round(bt.row_skip_ratio(keep) * len(routed))
    uniform_layers = most_skipped(keep, routed, k)
    dense, mind, forced = build_variants(ms, ["dense", "mindskip", "mindskip_forced"], uniform_layers)
    variants = {"dense": dense, "mindskip": mind, "uniform": forced}
    prompt, steps = ids[:, :context], ids[:, context:]

    def run_once(name):
        v = variants[name]
        with v.active(), torch.inference_mode():
            cache = new_cache(v.model)
            forward_step(v.model, prompt, cache, 0)

            def decode():
                for i in range(steps.shape[1]):
                    forward_step(v.model, steps[:, i:i + 1], cache, context + i)
            return timed_ms(decode, ids.device) / steps.shape[1]

    times = interleave(list(DECODE_VARIANTS), run_once, args.warmup, args.repeats)
    stats = {"dense": (0.0, 0.0, 1.0), "mindskip": (bt.row_skip_ratio(keep), bt.batch_skip_ratio(keep),
                                                    bt.batch_agreement(keep)),
             "uniform": (k / len(routed), k / len(routed), 1.0)}
    rows = []
    for name in DECODE_VARIANTS:
        t = times[name]
        ratios = sorted(d / x for d, x in zip(times["dense"], t))
        row_skip, batch_skip, agree = stats[name]
        rows.append(dict(batch_size=ids.shape[0], context=context, variant=name, median_ms=statistics.median(t),
                         p10_ms=_quantile(t, 0.1), p90_ms=_quantile(t, 0.9),
                         tokens_per_s=ids.shape[0] * 1e3 / statistics.median(t), speedup=statistics.median(ratios),
                         speedup_p10=_quantile(ratios, 0.1), speedup_p90=_quantile(ratios, 0.9),
                         row_skip_ratio=row_skip, batch_skip_ratio=batch_skip, batch_agreement=agree,
                         skipped_layers=" ".join(map(str, uniform_layers)) if name == "uniform" else "",
                         n_patterns=len({tuple(r) for r in keep.tolist()}) if name == "mindskip" else 1))
    return rows


def _quantile(xs, q):
    s = sorted(xs)
    return s[min(int(q * len(s)), len(s) - 1)]


# ---------------------------------------------------------------------------- part 2: generation
def plan_stats(keep: torch.Tensor, batches: list[list[int]]) -> dict:
    """What a batching plan leaves to run per decode step: routed sublayer calls (a layer runs
    in a batch when one of its rows keeps it) and the fraction of them saved against dense."""
    calls = sum(int(keep[b].any(0).sum()) for b in batches)
    return {"n_batches": len(batches), "mean_batch": keep.shape[0] / len(batches),
            "routed_calls_per_step": calls, "batch_skip_ratio": 1 - calls / (len(batches) * keep.shape[1])}


def generation(ms, ids, mask, pad, args):
    """Interleaved wall time of plain vs decision-aware batching on the same requests."""
    n, t_new, b = ids.shape[0], args.new_tokens, args.gen_batch
    kw = dict(do_sample=False, min_new_tokens=t_new)  # exactly T new tokens per request: equal work
    plain_batches = [list(range(i, min(i + b, n))) for i in range(0, n, b)]
    keep = bt.decisions(ms, ids, mask)
    plans = {"plain": plain_batches, **{p: bt.group_rows(keep, p, b) for p in GEN_PLANS[1:]}}
    outputs = {}

    def run(name):
        if name == "plain":
            return bt.generate_in_batches(ms, ids, mask, plain_batches, t_new, pad, **kw)
        return bt.generate_grouped(ms, None, ids, mask, t_new, policy=name, max_batch=b, pad_token_id=pad, **kw)

    def run_once(name):
        return timed_ms(lambda: outputs.__setitem__(name, run(name)), ids.device)

    times = interleave(list(GEN_PLANS), run_once, args.gen_warmup, args.gen_repeats)
    rows = []
    for name in GEN_PLANS:
        t, same = times[name], (outputs[name] == outputs["plain"]).all(1)
        rows.append(dict(plan=name, requests=n, new_tokens=t_new, max_batch=b, median_ms=statistics.median(t),
                         times_ms=t, tokens_per_s=n * t_new * 1e3 / statistics.median(t),
                         speedup_vs_plain=statistics.median(p / x for p, x in zip(times["plain"], t)),
                         outputs_equal=bool(same.all()), rows_equal=int(same.sum()), **plan_stats(keep, plans[name])))
    return rows, {"row_skip_ratio": bt.row_skip_ratio(keep), "n_patterns": len({tuple(r) for r in keep.tolist()}),
                  "prompt_lengths": mask.sum(1).tolist()}


# ---------------------------------------------------------------------------- output
def figure(rows, title):
    from rt_lib.plots import METHOD_STYLE, new_figure, percent_axis, style

    with style():
        fig, axes = new_figure(1, 2, size=(10.0, 3.8))
        ax, ax2 = axes[0]
        sizes = sorted({r["batch_size"] for r in rows})
        ax.axhline(1.0, color=METHOD_STYLE["dense"]["color"], linestyle=":", linewidth=1, label="dense")
        for name, label in (("mindskip", "MindSkip (routers)"), ("uniform", "uniform skip, same ratio")):
            st = METHOD_STYLE["mindskip" if name == "mindskip" else "mindskip_forced"]
            rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["batch_size"])
            y = [r["speedup"] for r in rs]
            err = [[v - r["speedup_p10"] for v, r in zip(y, rs)], [r["speedup_p90"] - v for v, r in zip(y, rs)]]
            ax.errorbar([r["batch_size"] for r in rs], y, yerr=err, color=st["color"], marker=st["marker"],
                        label=label, capsize=3)
        ax.set(xscale="log", xlabel="batch size", ylabel="decode speedup over dense (×)", title="decode step")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.legend()
        ms_rows = sorted((r for r in rows if r["variant"] == "mindskip"), key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in ms_rows]
        for col, label, ls in (("row_skip_ratio", "mean per-row skip ratio", "--"),
                               ("batch_skip_ratio", "skipped by the whole batch", "-"),
                               ("batch_agreement", "layers where all rows agree", ":")):
            ax2.plot(x, [r[col] for r in ms_rows], linestyle=ls, marker="o", label=label)
        ax2.set(xscale="log", xlabel="batch size", ylabel="fraction of routed layers", title="MindSkip decisions",
                ylim=(-0.02, 1.02))
        ax2.set_xticks(sizes, [str(s) for s in sizes])
        ax2.minorticks_off()
        percent_axis(ax2.yaxis)
        ax2.legend()
        fig.suptitle(title)
    return fig


def write(out: Path, rows, gen_rows, conditions) -> list[Path]:
    import pandas as pd

    from rt_lib.plots import save_figure

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=list(CSV_COLUMNS)).to_csv(out / "batching.csv", index=False)
    (out / "batching.json").write_text(json.dumps({"conditions": conditions, "decode": rows,
                                                   "generation": gen_rows}, indent=2) + "\n")
    title = f"{conditions['model']}, context {conditions['context']}, {conditions['dtype']}"
    return [out / "batching.csv", out / "batching.json", *save_figure(figure(rows, title), out / "batching")]


def _ints(text):
    return [int(x) for x in text.split(",") if x.strip()]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for batching.csv / .json / .png")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--routers", default=DEFAULT_ROUTERS, help="router checkpoint folder (seq routing)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--context", type=int, default=1024, help="part 1: prompt tokens per row")
    p.add_argument("--steps", type=int, default=16, help="part 1: timed decode steps per round")
    p.add_argument("--repeats", type=int, default=5, help="part 1: timed rounds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--requests", type=int, default=16, help="part 2: number of requests N")
    p.add_argument("--new-tokens", type=int, default=32, help="part 2: new tokens per request T")
    p.add_argument("--gen-context", type=int, default=256, help="part 2: longest prompt (lengths from half of it)")
    p.add_argument("--gen-batch", type=int, default=4, help="part 2: batch size B (decision-aware: at most B)")
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--gen-warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny random model and sizes: the same code path in seconds")
    a = p.parse_args(argv)
    if a.smoke:
        for k, v in SMOKE.items():
            setattr(a, k, v)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return a


def main(argv=None) -> int:
    import transformers

    from rt_lib.tuning.data import pad_token_id
    from rt_lib.speed.step import text_tokens

    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    ms, tok, routers = load(a)
    device = ms.device
    tokens = text_tokens(tok, "wikipedia-en", max_chars=20_000 if a.smoke else 400_000)
    ids = windows(tokens, max(a.batch_sizes), a.context + a.steps).to(device)
    keep_all = bt.decisions(ms, ids[:, :a.context])  # a row's decisions do not depend on the batch
    rows = []
    for b in a.batch_sizes:
        rows += decode_point(ms, ids[:b], a.context, keep_all[:b], a)
        print(" ".join(f"{r['variant']} {r['median_ms']:.2f} ms x{r['speedup']:.3f}" for r in rows[-3:])
              + f"  | B={b} row skip {rows[-2]['row_skip_ratio']:.3f} batch skip {rows[-2]['batch_skip_ratio']:.3f}"
              f" agreement {rows[-2]['batch_agreement']:.3f}", flush=True)
    pad = pad_token_id(tok)
    gids, gmask = padded_requests(tokens, a.requests, a.gen_context, pad, a.seed)
    gen_rows, gen_info = generation(ms, gids.to(device), gmask.to(device), pad, a)
    for r in gen_rows:
        print(f"{r['plan']:8s} {r['median_ms']:9.1f} ms  {r['tokens_per_s']:7.1f} tok/s  x{r['speedup_vs_plain']:.3f}  "
              f"batches {r['n_batches']:2d}  routed calls/step {r['routed_calls_per_step']:3d}  "
              f"batch skip {r['batch_skip_ratio']:.3f}  equal {r['outputs_equal']}", flush=True)
    conditions = dict(model=a.model, routers=routers, dtype=str(next(ms.model.parameters()).dtype).replace("torch.", ""),
                      device=str(device), cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                      torch=torch.__version__, transformers=transformers.__version__, routed_layers=list(ms.routed_layers),
                      granularity=ms.config.granularity, context=a.context, steps=a.steps, repeats=a.repeats,
                      warmup=a.warmup, requests=a.requests, new_tokens=a.new_tokens, gen_context=a.gen_context,
                      gen_batch=a.gen_batch, gen_repeats=a.gen_repeats, seed=a.seed, smoke=a.smoke, text="wikipedia-en",
                      generation_decisions=gen_info, argv=sys.argv[1:] if argv is None else list(argv),
                      wall_time_s=round(time.perf_counter() - t0, 1))
    for path in write(Path(a.out), rows, gen_rows, conditions):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

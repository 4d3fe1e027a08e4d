"""`make reproduce`: one command from a fresh clone to result files (first version).

    python -m rt_lib.reproduce --preset cpu [--run-id ID] [--out results/runs]

For now this is the sanity step of the pipeline: load the preset's model, measure its
perplexity on the held-out ``wikipedia-en`` validation text and greedily complete a fixed
prompt, writing ``<out>/<run-id>/sanity.json`` and ``run.json``. The notebook steps
(tuning, evaluation, profiling, paper artefacts) are added to this runner later.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SanityPreset:
    model: str  # rt_lib.assets.load_model name
    chunk_tokens: int  # perplexity is measured on non-overlapping chunks of this many tokens
    chunks: int  # the first `chunks` chunks of the validation text
    batch_size: int
    prompt: str
    new_tokens: int


PRESETS: dict[str, SanityPreset] = {
    # tiny random model: exercises the code path in seconds; numbers mean nothing
    "smoke": SanityPreset("tiny-random-llama", 64, 4, 4, "The capital of France is", 8),
    # embedded SmolLM2-135M: 32 x 256 = 8192 tokens, about 20 s on 2 CPU cores
    "cpu": SanityPreset("smollm2-135m-instruct", 256, 32, 8, "The capital of France is", 16),
}


def heldout_perplexity(model, tokenizer, texts, chunk_tokens: int, chunks: int, batch_size: int) -> dict:
    """Perplexity on the first ``chunks`` non-overlapping ``chunk_tokens``-token chunks of the
    texts joined by blank lines (no BOS: SmolLM2's tokenizer adds none, as in its training)."""
    import torch

    ids: list[int] = []
    need = chunk_tokens * chunks
    for text in texts:
        ids.extend(tokenizer(text + "\n\n").input_ids)
        if len(ids) >= need:
            break
    n = min(chunks, len(ids) // chunk_tokens)
    if n == 0:
        raise ValueError(f"held-out text has {len(ids)} tokens, fewer than one chunk of {chunk_tokens}")
    data = torch.tensor(ids[: n * chunk_tokens]).view(n, chunk_tokens)  # (n, T)
    device = next(model.parameters()).device
    nll, scored = 0.0, 0
    with torch.no_grad():
        for batch in data.split(batch_size):
            batch = batch.to(device)
            logits = model(batch).logits[:, :-1].float()  # (B, T-1, V)
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            scored += batch[:, 1:].numel()
    return {
        "text": "wikipedia-en/validation",
        "chunk_tokens": chunk_tokens,
        "chunks": n,
        "tokens_scored": scored,
        "mean_nll": nll / scored,
        "perplexity": math.exp(nll / scored),
    }


def greedy_completion(model, tokenizer, prompt: str, new_tokens: int) -> str:
    import torch

    inputs = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run_sanity(preset: str, run_id: str | None = None, out: str | Path = "results/runs") -> Path:
    from rt_lib import assets, runs

    p = PRESETS[preset]
    run_dir = runs.new_run(out, run_id=run_id, preset=preset, parameters={"sanity": asdict(p)})
    t0 = time.perf_counter()
    model, tok = assets.load_model(p.model)
    load_s = time.perf_counter() - t0
    texts = assets.load_dataset("wikipedia-en", split="validation")["text"]
    t1 = time.perf_counter()
    ppl = heldout_perplexity(model, tok, texts, p.chunk_tokens, p.chunks, p.batch_size)
    ppl_s = time.perf_counter() - t1
    completion = greedy_completion(model, tok, p.prompt, p.new_tokens)
    result = {
        "preset": preset,
        "model": p.model,
        "model_source": getattr(model.config, "rt_kit_source", None),
        "dtype": str(model.dtype),
        "heldout": ppl,
        "generation": {"prompt": p.prompt, "completion": completion, "new_tokens": p.new_tokens, "greedy": True},
        "timing_s": {"load_model": round(load_s, 2), "perplexity": round(ppl_s, 2), "total": round(time.perf_counter() - t0, 2)},
    }
    runs.atomic_write_json(run_dir / "sanity.json", result)
    runs.update_run(run_dir, "sanity", {"file": "sanity.json", "perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens_scored"]})
    print(
        f"[{preset}] {p.model}: held-out perplexity {ppl['perplexity']:.2f} on {ppl['tokens_scored']} tokens "
        f"({ppl['chunks']} x {ppl['chunk_tokens']}); {p.prompt!r} -> {completion!r}\n"
        f"wrote {run_dir / 'sanity.json'} (total {result['timing_s']['total']:.1f} s)"
    )
    return run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rt_lib.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help=f"one of: {', '.join(PRESETS)} (default: cpu)")
    parser.add_argument("--run-id", default=None, help="run folder name (default: <time>-<preset>)")
    parser.add_argument("--out", default="results/runs", help="parent folder of run folders")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"unknown preset {args.preset!r}; valid presets: {', '.join(PRESETS)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_sanity(args.preset, args.run_id, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

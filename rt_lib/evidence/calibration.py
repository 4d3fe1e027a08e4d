"""Where MindSkip routers skip a given number of sublayers: the threshold calibration shared by
the evidence run (``rt_lib.evidence.run``) and the frontier (``rt_lib.evidence.frontier``).

``skipped_layers`` counts the routed sublayers skipped per sequence on text blocks (through the
decoder without its LM head: decisions need hidden states only); ``calibrate_threshold`` finds
the threshold that skips a target number, by bisection or guided by the dense model's router
scores. May import the model core (``rt_lib.mindskip``) and the tuning data helpers only.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from rt_lib.mindskip.architecture import find_decoder

BISECTION_STEPS = 14


@torch.no_grad()
def skipped_layers(ms, blocks: list[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean number of routed sublayers skipped per sequence (token routing: per token) on ``blocks``."""
    from rt_lib.tuning.data import collate

    ms.reset_stats()
    run = find_decoder(ms.model)[0]  # without the LM head: decisions need hidden states only (~20% less work)
    for i in range(0, len(blocks), batch_size):
        batch = collate(blocks[i:i + batch_size], pad_id)
        run(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return float(sum(1.0 - c for c in ms.capacities().values()))


def calibrate_threshold(ms, blocks: list[dict], pad_id: int, target: float, steps: int = BISECTION_STEPS,
                        tolerance: float = 0.0) -> dict:
    """The threshold at which the routers skip ``target`` sublayers per sequence on ``blocks``
    (more is skipped as the threshold rises), keeping the closest point tried.

    ``tolerance == 0``: bisection on [0, 1], ``steps`` evaluations. ``tolerance > 0``: stop once a
    point is within ``tolerance`` layers of the target, and guess each point from the router
    scores of the dense model (one extra pass: with nothing skipped, the skip count at a threshold
    is the number of scores below it): the first guess is the threshold at which those scores
    would skip ``target`` layers, each later one aims that estimate at the target corrected by the
    error seen so far; a guess outside the bracket of measured points falls back to bisection.
    Later layers' scores move when earlier ones skip, which is why guesses are measured."""
    lo, hi = 0.0, 1.0
    best = None
    trace = []
    scores = _dense_router_scores(ms, blocks, pad_id) if tolerance > 0 else None
    aim = float(target)
    for _ in tqdm(range(steps), desc=f"threshold for {target:g} skipped", leave=False):
        tau = (lo + hi) / 2
        if scores is not None:
            guess = _threshold_for(scores, aim, len(blocks))
            if lo < guess < hi:
                tau = guess
        ms.set_threshold(tau)
        s = skipped_layers(ms, blocks, pad_id)
        trace.append([tau, s])
        if best is None or abs(s - target) < abs(best[1] - target):
            best = (tau, s)
        if abs(s - target) <= tolerance:
            break
        lo, hi = (tau, hi) if s < target else (lo, tau)
        aim += target - s
    return {"target_skipped": target, "threshold": best[0], "skipped": best[1], "trace": trace}


def _dense_router_scores(ms, blocks: list[dict], pad_id: int) -> "np.ndarray":
    """Every routed layer's router score on every block with nothing skipped (threshold 0)."""
    got: list[torch.Tensor] = []
    hooks = [g.router.register_forward_hook(lambda m, args, out: got.append(torch.sigmoid(out.float()).flatten()))
             for g in ms.gates.values()]
    old = ms.config.threshold
    try:
        ms.set_threshold(0.0)
        skipped_layers(ms, blocks, pad_id)
    finally:
        ms.set_threshold(old)
        for h in hooks:
            h.remove()
    return torch.cat(got).cpu().numpy() if got else np.zeros(0)


def _threshold_for(scores: "np.ndarray", skipped: float, n_blocks: int) -> float:
    """The threshold at which ``scores`` (all layers' over ``n_blocks`` sequences) put ``skipped``
    layers per sequence below it: midway between the two scores around that count."""
    s = np.sort(scores)
    m = int(round(min(max(skipped, 0.0), len(s) / max(n_blocks, 1)) * n_blocks))
    if m <= 0:
        return float(s[0]) / 2 if len(s) else 0.5
    if m >= len(s):
        return (float(s[-1]) + 1.0) / 2
    return (float(s[m - 1]) + float(s[m])) / 2

"""Greedy generations of one prompt with the routers forced on and deciding (notebook 01's
side-by-side). May import the model handle (``rt_lib.mindskip.model``) only.
"""

from __future__ import annotations

import torch

from rt_lib.mindskip.model import MindSkipModel


def compare_generations(ms: MindSkipModel, tokenizer, prompt: str, *, max_new_tokens: int = 40) -> dict[str, tuple[str, float]]:
    """Greedy continuations of ``prompt`` with every router forced to keep (``dense``, the base
    model) and with the routers deciding (``mindskip``): ``{label: (text, skip ratio)}``. With
    ``seq`` routing the decision is taken once from the prompt and reused at every decode step.
    The routers' forcing is what it was before afterwards, also when generation fails."""
    enc = tokenizer(prompt, return_tensors="pt").to(ms.device)
    start = enc["input_ids"].shape[1]
    out = {}
    for label, decisions in (("dense", True), ("mindskip", None)):
        with ms.forced(decisions), torch.no_grad():
            ms.reset_stats()
            ids = ms.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
            out[label] = (tokenizer.decode(ids[0, start:], skip_special_tokens=True), ms.skip_ratio())
    return out

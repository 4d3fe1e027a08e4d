"""Log-likelihood scoring with each context computed once, and routing decided from the context.

The harness asks for ``log p(continuation | context)`` of several continuations per context (the
four endings of a HellaSwag question, the two solutions of a PIQA goal). Scored one request at a
time, every context is recomputed once per continuation, and a sequence router pools its
decision over context *and* continuation, so the answer being scored can change which layers
run. Here instead:

1. the distinct contexts of a batch are prefilled once (left-padded, explicit positions, a KV
   cache): a sequence router decides there, from the context's tokens only, as it does at the
   prefill of a deployed model; the last position's logits score every continuation's first token;
2. the cache rows are repeated for the continuations of each context (``cache.reorder_cache``,
   which MindSkip follows for its stored decisions, kept rows and token histories);
3. the continuations (without their last token) run in one batch on that cache, as decode steps
   do, reusing the context's decisions; their logits score the remaining tokens.

For a dense model or a static drop this is the same computation as one forward over context +
continuation (equal to float tolerance: the order of floating-point sums differs). Token-level
routing decides per token from that token's hidden state, which depends only on earlier tokens,
so its decisions are the same as in one forward too; only the computation is shared.

Skip counts: the decisions counted are the prefill's, one per context (per document for
multiple-choice tasks); the continuation pass reuses them and is not counted again (token
routing: context tokens once, and the continuation tokens of every request).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def plan_groups(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int):
    """``(groups, rest)``: ``groups`` maps each context (a tuple of token ids) to the indices of the
    requests that share it, longest continuation first (then longest context); ``rest`` are the indices of requests too long
    for ``max_length`` (context + continuation - 1 tokens), which need the harness's truncation."""
    groups: dict[tuple[int, ...], list[int]] = {}
    rest = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont or len(ctx) + len(cont) - 1 > max_length:
            rest.append(i)
            continue
        groups.setdefault(tuple(ctx), []).append(i)
    # contexts whose continuations have similar lengths share a batch: the continuation pass is
    # padded to its longest continuation, and continuations are most of the tokens
    longest = {c: max(len(requests[i][1]) for i in idx) for c, idx in groups.items()}
    order = sorted(groups, key=lambda c: (-longest[c], -len(c), c))
    return {c: groups[c] for c in order}, rest


def score_shared_context(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int,
                         max_length: int, pad_id: int, device: torch.device | str = "cpu",
                         autocast_dtype: torch.dtype | None = None, gates: dict | None = None,
                         on_batch: Callable[[int], None] | None = None) -> tuple[list, list[int]]:
    """``(results, rest)``: ``results[i]`` is ``(sum of log p(continuation_i), greedy_i)`` for each
    request ``(context ids, continuation ids)`` that fits ``max_length``, None for the others,
    whose indices are ``rest`` (score them the usual way). ``batch_size`` contexts are prefilled
    at once. ``gates``: the MindSkip gates (layer -> gate) whose skip counts the continuation
    pass must not change (None: a model without routers). ``on_batch(n)``: called with the
    number of requests scored after each batch (progress)."""
    from transformers import DynamicCache

    from rt_lib.mindskip.gates import SeqGate

    device = torch.device(device)
    groups, rest = plan_groups(requests, max_length)
    results: list = [None] * len(requests)
    contexts = list(groups)
    autocast = torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    for start in range(0, len(contexts), max(int(batch_size), 1)):
        chunk = contexts[start:start + max(int(batch_size), 1)]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, c in enumerate(chunk):  # left padding: every context ends at the last position
            ids[b, width - len(c):] = torch.tensor(c)
            mask[b, width - len(c):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), autocast:
            first = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                          use_cache=True, logits_to_keep=1).logits[:, -1].float().log_softmax(-1)  # (G, V)
        rows = [(b, i) for b, c in enumerate(chunk) for i in groups[c]]
        conts = [list(requests[i][1]) for _, i in rows]
        owner = torch.tensor([b for b, _ in rows], device=device)
        steps = max(len(c) for c in conts) - 1
        later = None
        if steps > 0:
            cache.reorder_cache(owner)  # each continuation gets its context's cache rows (and decisions)
            step_ids = torch.full((len(rows), steps), pad_id, dtype=torch.long)
            step_mask = torch.zeros((len(rows), steps), dtype=torch.long)
            for r, c in enumerate(conts):
                step_ids[r, :len(c) - 1] = torch.tensor(c[:-1])
                step_mask[r, :len(c) - 1] = 1
            step_ids, step_mask = step_ids.to(device), step_mask.to(device)
            full_mask = torch.cat([mask.index_select(0, owner), step_mask], dim=1)
            step_pos = mask.sum(-1).index_select(0, owner).unsqueeze(1) + torch.arange(steps, device=device)
            saved = {i: (g.n_exec, g.n_total) for i, g in (gates or {}).items()}
            try:
                with torch.no_grad(), autocast:
                    later = model(input_ids=step_ids, attention_mask=full_mask, position_ids=step_pos,
                                  cache=cache, use_cache=True).logits.float().log_softmax(-1)
            finally:  # the continuation pass reuses the prefill's sequence decisions: counted once
                for i, g in (gates or {}).items():
                    if isinstance(g, SeqGate):
                        g.n_exec, g.n_total = saved[i]
        for r, ((b, i), c) in enumerate(zip(rows, conts)):
            target = torch.tensor(c, device=device)
            lp = first[b, target[0]]
            greedy = bool(first[b].argmax() == target[0])
            if len(c) > 1:
                scores = later[r, :len(c) - 1]
                lp = lp + scores.gather(-1, target[1:].unsqueeze(-1)).sum()
                greedy = greedy and bool((scores.argmax(-1) == target[1:]).all())
            results[i] = (float(lp), greedy)
        if on_batch is not None:
            on_batch(len(rows))
    return results, rest

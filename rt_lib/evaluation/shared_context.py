"""Log-likelihood scoring with each context computed once, and routing decided from the context.

The harness asks for ``log p(continuation | context)`` of several continuations per context (the
four endings of a HellaSwag question, the two solutions of a PIQA goal). Scored one request at a
time, every context is recomputed once per continuation, and a sequence router pools its
decision over context *and* continuation, so the answer being scored can change which layers
run. Here instead:

1. the distinct contexts of a batch are prefilled once (left-padded, explicit positions, a KV
   cache): a sequence router decides there, from the context's tokens only, as it does at the
   prefill of a deployed model; the last position's logits score every continuation's first token;
2. the continuations of each context (without their last token) run on that cache in the
   context's own row, one after another, as decode steps do, reusing the context's decisions; an
   attention mask lets each continuation see the context and its own earlier tokens only, and
   positions restart after the context for each one, so every continuation is computed as if it
   were alone after its context ("packed" continuations: no row is repeated, and padding is only
   the difference between rows' total continuation lengths; contexts are batched in order of
   that total, then of length);
3. the output projection runs only at the continuation tokens' positions (not at padding), and
   their log-probabilities score the remaining tokens.

Token-level routing keeps per-token histories in its gates that a custom attention mask would not
follow: there (and with an attention kernel that takes no custom mask, such as flash-attention)
the cache rows are repeated for the continuations instead (``cache.reorder_cache``, which
MindSkip follows for its stored decisions, kept rows and token histories) and the continuations
run in one batch of their own rows.

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
    requests that share it, in batching order: largest total continuation length first (the
    continuation pass is padded to it), then longest context (the prefill is padded to it);
    ``rest`` are the indices of requests too long for ``max_length`` (context + continuation - 1
    tokens), which need the harness's truncation."""
    groups: dict[tuple[int, ...], list[int]] = {}
    rest = []
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont or len(ctx) + len(cont) - 1 > max_length:
            rest.append(i)
            continue
        groups.setdefault(tuple(ctx), []).append(i)
    total = {c: sum(len(requests[i][1]) - 1 for i in idx) for c, idx in groups.items()}
    order = sorted(groups, key=lambda c: (-total[c], -len(c), c))
    return {c: groups[c] for c in order}, rest


def packs_continuations(model, gates: dict | None) -> bool:
    """Whether the continuations of a context can share its row (see the module docstring)."""
    from rt_lib.mindskip.gates import TokenGate

    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl in ("sdpa", "eager") and not any(isinstance(g, TokenGate) for g in (gates or {}).values())


def score_shared_context(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int,
                         max_length: int, pad_id: int, device: torch.device | str = "cpu",
                         autocast_dtype: torch.dtype | None = None, gates: dict | None = None,
                         on_batch: Callable[[int], None] | None = None,
                         pack: bool | None = None) -> tuple[list, list[int]]:
    """``(results, rest)``: ``results[i]`` is ``(sum of log p(continuation_i), greedy_i)`` for each
    request ``(context ids, continuation ids)`` that fits ``max_length``, None for the others,
    whose indices are ``rest`` (score them the usual way). ``batch_size`` contexts are prefilled
    at once. ``gates``: the MindSkip gates (layer -> gate) whose skip counts the continuation
    pass must not change (None: a model without routers). ``on_batch(n)``: called with the
    number of requests scored after each batch (progress). ``pack``: continuations in their
    context's row (True; refused where ``packs_continuations`` says no), in rows of their own
    (False), or whichever the model allows (None)."""
    from transformers import DynamicCache

    from rt_lib.mindskip.gates import SeqGate

    device = torch.device(device)
    groups, rest = plan_groups(requests, max_length)
    results: list = [None] * len(requests)
    contexts = list(groups)
    packed = packs_continuations(model, gates)
    if pack and not packed:
        raise ValueError("continuations cannot share their context's row here (token routing, or an attention "
                         "kernel without custom masks): use pack=None or False")
    packed = packed if pack is None else bool(pack)
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
        saved = {i: (g.n_exec, g.n_total) for i, g in (gates or {}).items()}
        try:  # the continuation pass reuses the prefill's sequence decisions: counted once
            run = _packed_pass if packed else _repeated_pass
            later = run(model, cache, mask, [b for b, _ in rows], conts, pad_id, device, autocast)
        finally:
            for i, g in (gates or {}).items():
                if isinstance(g, SeqGate):
                    g.n_exec, g.n_total = saved[i]
        for r, ((b, i), c) in enumerate(zip(rows, conts)):
            target = torch.tensor(c, device=device)
            lp = first[b, target[0]]
            greedy = bool(first[b].argmax() == target[0])
            if len(c) > 1:
                scores = later[r]  # (len(c) - 1, V) log-probabilities of tokens 2..
                lp = lp + scores.gather(-1, target[1:].unsqueeze(-1)).sum()
                greedy = greedy and bool((scores.argmax(-1) == target[1:]).all())
            results[i] = (float(lp), greedy)
        if on_batch is not None:
            on_batch(len(rows))
    return results, rest


def _log_probs_at(model, hidden: torch.Tensor, where: list[tuple[int, int, int]]) -> list:
    """Log-probabilities from ``hidden`` (B, T, H) at ``(row, start, length)`` runs of positions:
    the output projection runs at those positions only."""
    if not where:
        return []
    take = torch.cat([torch.arange(s, s + n, device=hidden.device) + b * hidden.shape[1] for b, s, n in where])
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, take)
    lp = model.get_output_embeddings()(h).float().log_softmax(-1)
    return list(lp.split([n for _, _, n in where]))


def _packed_pass(model, cache, mask, owner: list[int], conts: list[list[int]], pad_id: int, device, autocast) -> list:
    """Every context's continuations in its own row after it (see the module docstring)."""
    g, width = mask.shape
    segments: list[list[tuple[int, int]]] = [[] for _ in range(g)]  # (offset, length) per continuation
    where: list[tuple[int, int, int] | None] = []
    for b, c in zip(owner, conts):
        n = len(c) - 1
        off = sum(k for _, k in segments[b])
        segments[b].append((off, n))
        where.append((b, off, n) if n > 0 else None)
    steps = max(sum(k for _, k in seg) for seg in segments)
    if steps == 0:
        return [None] * len(conts)
    ids = torch.full((g, steps), pad_id, dtype=torch.long)
    pos = torch.zeros((g, steps), dtype=torch.long)
    # key j of the new tokens is visible to query q iff both lie in one continuation and j <= q;
    # a padding query sees itself only (its output is never read)
    seg_id = torch.full((g, steps), -1, dtype=torch.long)
    for (b, c), w in zip(zip(owner, conts), where):
        if w is None:
            continue
        _, off, n = w
        ids[b, off:off + n] = torch.tensor(c[:-1])
        seg_id[b, off:off + n] = off
    ctx_len = mask.sum(-1).cpu()
    for b in range(g):
        for off, n in segments[b]:
            pos[b, off:off + n] = ctx_len[b] + torch.arange(n)
    idx = torch.arange(steps)
    causal = idx[None, :] <= idx[:, None]
    same = (seg_id[:, :, None] == seg_id[:, None, :]) & (seg_id[:, :, None] >= 0)
    new = (same & causal) | torch.eye(steps, dtype=torch.bool)
    old = mask.bool().cpu()[:, None, :].expand(g, steps, width) & (seg_id >= 0)[:, :, None]
    allowed = torch.cat([old, new], dim=-1)[:, None]  # (G, 1, steps, width + steps)
    dtype = next(model.parameters()).dtype
    if autocast.fast_dtype is not None and autocast._enabled:
        dtype = autocast.fast_dtype
    attn = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    decoder = model.get_decoder()
    with torch.no_grad(), autocast:
        hidden = decoder(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                         cache=cache, use_cache=True).last_hidden_state
        lps = iter(_log_probs_at(model, hidden, [w for w in where if w is not None]))
    return [next(lps) if w is not None else None for w in where]


def _repeated_pass(model, cache, mask, owner: list[int], conts: list[list[int]], pad_id: int, device,
                   autocast) -> list:
    """Each continuation in a row of its own, on its context's cache rows repeated."""
    steps = max(len(c) for c in conts) - 1
    if steps <= 0:
        return [None] * len(conts)
    own = torch.tensor(owner, device=device)
    cache.reorder_cache(own)  # each continuation gets its context's cache rows (and decisions)
    step_ids = torch.full((len(conts), steps), pad_id, dtype=torch.long)
    step_mask = torch.zeros((len(conts), steps), dtype=torch.long)
    for r, c in enumerate(conts):
        step_ids[r, :len(c) - 1] = torch.tensor(c[:-1])
        step_mask[r, :len(c) - 1] = 1
    step_ids, step_mask = step_ids.to(device), step_mask.to(device)
    full_mask = torch.cat([mask.index_select(0, own), step_mask], dim=1)
    step_pos = mask.sum(-1).index_select(0, own).unsqueeze(1) + torch.arange(steps, device=device)
    decoder = model.get_decoder()
    with torch.no_grad(), autocast:
        hidden = decoder(input_ids=step_ids, attention_mask=full_mask, position_ids=step_pos,
                         cache=cache, use_cache=True).last_hidden_state
        where = [(r, 0, len(c) - 1) for r, c in enumerate(conts) if len(c) > 1]
        lps = iter(_log_probs_at(model, hidden, where))
    return [next(lps) if len(c) > 1 else None for c in conts]

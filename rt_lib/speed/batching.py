"""Batching under sequence routing: how much of the per-request skipping a batch keeps, and
decision-aware batching that keeps more of it.

Under `seq` routing (`rt_lib.mindskip.gates.SeqGate`) each request takes one keep/skip decision per
routed layer at prefill and reuses it at every decode step. In a batch, a routed sublayer still
runs at a decode step whenever any row keeps it (on the kept rows only); in the memory-bound
decode regime its weights are read all the same, so what a batch saves is essentially the
layers that *all* its rows skip. A batch of 16 rows that each skip 60% of the routed layers may
skip few of them together.

    keep = decisions(ms, ids, mask)            # (rows, routed layers) bool, one prefill
    row_skip_ratio(keep)                       # mean per-request skip ratio
    batch_skip_ratio(keep)                     # layers skipped by the whole batch
    batch_agreement(keep)                      # layers on which all rows agree
    out = generate_grouped(ms, tok, ids, mask, max_new_tokens=32, max_batch=8)

`generate_grouped` prefills the requests once, reads each request's decisions, groups requests
(`group_rows`) and decodes each group as its own batch, continuing from the group's rows of the
prefill cache. Decisions of a request do not depend on the other rows of its batch, so the
outputs are those of generating each request alone (greedy: the same token ids, up to
floating-point ties).
"""

from __future__ import annotations

import torch

from rt_lib.mindskip.config import KV_GRANULARITIES
from rt_lib.speed.timing import cache_argument, new_cache

POLICIES = ("pattern", "cluster")
# one sequence per request, lengths counted from the prompt: what grouping can honour
_REFUSED = {
    "num_beams": "beam search expands rows inside generate",
    "num_return_sequences": "one sequence per request",
    "return_dict_in_generate": "the result is a tensor of token ids",
    "max_length": "use max_new_tokens (a group's prompt is cut to its longest request)",
    "position_ids": "positions come from attention_mask",
    "cache": "each group gets its own cache",
    "past_key_values": "each group gets its own cache",
}


# ---------------------------------------------------------------------------- decisions
def _check_model(ms) -> None:
    if ms.config.route_level != "seq":
        raise ValueError(f"batching by decisions needs seq routing (one decision per request); "
                         f"these routers use route_level={ms.config.route_level!r}")
    if ms.model.training:
        raise ValueError("the model is in training mode; call ms.eval() first")


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as `generate` builds them."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 0)


def _keep_matrix(ms) -> torch.Tensor:
    """(rows, routed layers) decisions of the last prefill, read from the gates."""
    gates = ms.gates
    return torch.stack([gates[i].last_keep.reshape(-1).bool().cpu() for i in ms.routed_layers], 1)


def decisions(ms, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each request's keep decision per routed layer, as `seq` routing takes it at prefill.

    One forward of the (left-padded) batch without cache. Returns a CPU bool tensor of shape
    (rows, len(ms.routed_layers)), columns in the order of `ms.routed_layers`; True = the row
    runs that layer's routed sublayer. Scores pool over each row's real tokens only, so a row's
    decisions do not depend on the other rows or on its padding (up to floating-point ties at
    the threshold)."""
    _check_model(ms)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        ms.model(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False,
                 logits_to_keep=1)
    return _keep_matrix(ms)


# ---------------------------------------------------------------------------- agreement metrics
def _as_keep(keep) -> torch.Tensor:
    k = torch.as_tensor(keep).bool()
    k = k.unsqueeze(0) if k.ndim == 1 else k
    if k.ndim != 2 or k.shape[0] == 0:
        raise ValueError(f"keep must be a (rows, layers) matrix with at least one row, got shape {tuple(k.shape)}")
    return k


def batch_agreement(keep) -> float:
    """Fraction of routed layers on which every row of the batch agrees (all keep or all skip)."""
    k = _as_keep(keep)
    return float((k.all(0) | ~k.any(0)).float().mean())


def batch_skip_ratio(keep) -> float:
    """Fraction of routed layers that every row skips: the (layer, step) units the batch saves."""
    return float((~_as_keep(keep).any(0)).float().mean())


def row_skip_ratio(keep) -> float:
    """Mean per-row skip ratio: what the requests would save if each ran alone."""
    return float((~_as_keep(keep)).float().mean())


# ---------------------------------------------------------------------------- grouping
def group_rows(keep, policy: str = "pattern", max_batch: int | None = None) -> list[list[int]]:
    """Partition the rows of `keep` into batches (lists of row indices, each in increasing order).

    - "pattern": rows with identical decisions form a group (groups in order of first
      appearance), cut into batches of at most `max_batch`. Every batch skips each layer its
      pattern skips, but with many distinct patterns the batches get small (down to one row).
    - "cluster": batches of exactly `max_batch` rows (the last may be smaller), built greedily:
      start from the remaining row that keeps fewest layers, then add the row that adds fewest
      layers to the batch's kept set (ties: fewest disagreements with it). Keeps batches full
      when patterns are many, at the price of mixed decisions: a batch runs a layer whenever one
      of its rows keeps it. Without `max_batch` it is one batch of all rows (plain batching).
    """
    k = _as_keep(keep)
    n = k.shape[0]
    cap = n if max_batch is None else int(max_batch)
    if cap < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if policy == "pattern":
        groups: dict[tuple, list[int]] = {}
        for r in range(n):
            groups.setdefault(tuple(k[r].tolist()), []).append(r)
        return [g[i:i + cap] for g in groups.values() for i in range(0, len(g), cap)]
    if policy == "cluster":
        return _cluster(k, cap)
    raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")


def _cluster(k: torch.Tensor, cap: int) -> list[list[int]]:
    left = torch.ones(k.shape[0], dtype=torch.bool)
    n_kept = k.sum(1)
    width = k.shape[1] + 1
    batches = []
    while bool(left.any()):
        idx = left.nonzero().squeeze(1)
        seed = int(idx[torch.argmin(n_kept[idx])])  # argmin returns the first minimum: lowest index
        batch, union = [seed], k[seed].clone()
        left[seed] = False
        while len(batch) < cap and bool(left.any()):
            idx = left.nonzero().squeeze(1)
            cand = k[idx]
            score = (cand & ~union).sum(1) * width + (cand ^ union).sum(1)
            best = int(idx[torch.argmin(score)])
            batch.append(best)
            union |= k[best]
            left[best] = False
        batches.append(sorted(batch))
    return batches


# ---------------------------------------------------------------------------- generation
def _pad_id(ms, tokenizer, kwargs) -> int:
    gen = getattr(ms.model, "generation_config", None)
    for v in (kwargs.get("pad_token_id"), getattr(tokenizer, "pad_token_id", None),
              getattr(gen, "pad_token_id", None), getattr(ms.model.config, "pad_token_id", None),
              getattr(gen, "eos_token_id", None)):
        v = v[0] if isinstance(v, (list, tuple)) and v else v
        if isinstance(v, int):
            return v
    raise ValueError("no pad token id: pass pad_token_id=..., or a tokenizer that has one")


def _can_split_cache(ms) -> bool:
    """True when every layer of the model's cache is a plain concatenating `DynamicLayer`, whose
    rows and time steps can be cut out of a prefilled cache (sliding windows cannot)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(new_cache(ms.model), "layers", []))


def _prefill(ms, input_ids, mask, chunk: int):
    """Prefill the rows in chunks of `chunk`; returns (per layer (keys, values) over all rows,
    padded on the left to the full width, or None where no row stored any; keep matrix)."""
    width = input_ids.shape[1]
    parts: list[list[tuple]] = []
    keeps = []
    with torch.no_grad():
        for lo in range(0, input_ids.shape[0], chunk):
            m = mask[lo:lo + chunk]
            start = _first_real_column(m)
            ids, m = input_ids[lo:lo + chunk, start:], m[:, start:]
            cache = new_cache(ms.model)
            ms.model(input_ids=ids, attention_mask=m, position_ids=_positions(m), use_cache=True, logits_to_keep=1,
                     **{cache_argument(ms.model): cache})
            keeps.append(_keep_matrix(ms))
            for i, layer in enumerate(cache.layers):
                if len(parts) <= i:
                    parts.append([])
                if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel():
                    pad = (0, 0, width - layer.keys.shape[-2], 0)  # zeros in masked columns
                    parts[i].append((torch.nn.functional.pad(layer.keys, pad),
                                     torch.nn.functional.pad(layer.values, pad)))
    kv = [(torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) if ps else None for ps in parts]
    return kv, torch.cat(keeps)


def _first_real_column(mask: torch.Tensor) -> int:
    """First column that holds a real token of some row (left padding common to all rows ends)."""
    cols = mask.bool().any(0).nonzero()
    return int(cols[0]) if cols.numel() else 0


def _group_cache(ms, kv, keep, rows: torch.Tensor, start: int):
    """The cache of the batch `rows` (prompt columns start..-1; the last prompt token is fed
    again by generate), with the gates bound to it. A `seq`-routed attention/block layer caches
    only its kept rows, in batch order: old row r sits at slot (number of kept rows before r)."""
    cache = new_cache(ms.model)
    routed = {layer: j for j, layer in enumerate(ms.routed_layers)}
    subset = ms.config.granularity in KV_GRANULARITIES  # mlp, moe: every layer caches every row
    for i, entry in enumerate(kv):
        if entry is None:
            continue
        if subset and i in routed:
            col = keep[:, routed[i]]
            kept = rows[col[rows]]
            if kept.numel() == 0:
                continue
            idx = (col.long().cumsum(0) - 1)[kept]
        else:
            idx = rows
        k, v = (t.index_select(0, idx.to(t.device))[..., start:-1, :] for t in entry)
        cache.update(k, v, i)
    ms.bind_decisions(cache, keep[rows])
    return cache


def _generate_rows(ms, input_ids, mask, rows, gen_kwargs, kv=None, keep=None):
    """New tokens of the batch `rows`: continuing from the prefill `kv`, or (kv None) a plain
    generate with the decisions `keep` forced (None: the routers decide)."""
    start = _first_real_column(mask[rows])
    ids, m = input_ids[rows, start:], mask[rows, start:]
    if kv is not None:
        cache = _group_cache(ms, kv, keep, rows, start)
        out = ms.generate(input_ids=ids, attention_mask=m, **{cache_argument(ms.model): cache}, **gen_kwargs)
        return out[:, ids.shape[1]:]
    saved = {i: g.forced for i, g in ms.gates.items()}
    try:
        if keep is not None:
            ms.force({layer: keep[rows, j] for j, layer in enumerate(ms.routed_layers)})
        out = ms.generate(input_ids=ids, attention_mask=m, **gen_kwargs)
    finally:
        for i, g in ms.gates.items():
            g.forced = saved[i]
    return out[:, ids.shape[1]:]


def generate_in_batches(ms, input_ids, attention_mask, batches, max_new_tokens: int, pad_token_id: int,
                        **generate_kwargs) -> torch.Tensor:
    """Plain batching: `ms.generate` on each batch of rows (its prompts cut to its longest),
    the routers deciding; returns (rows, prompt width + new tokens) in the original row order,
    laid out as one `generate` call on the whole left-padded batch lays it out."""
    kw = dict(generate_kwargs, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id)
    news = [_generate_rows(ms, input_ids, attention_mask, torch.as_tensor(b), kw) for b in batches]
    return _assemble(input_ids, batches, news, pad_token_id)


def _assemble(input_ids, batches, news, pad: int) -> torch.Tensor:
    n, width = input_ids.shape
    out = input_ids.new_full((n, width + max(t.shape[1] for t in news)), pad)
    out[:, :width] = input_ids
    for rows, new in zip(batches, news):
        out[torch.as_tensor(rows), width:width + new.shape[1]] = new.to(out.device)
    return out


def generate_grouped(ms, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     max_new_tokens: int = 32, policy: str = "pattern", max_batch: int | None = None,
                     reuse_prefill: bool | None = None, **generate_kwargs) -> torch.Tensor:
    """Generate for left-padded requests, batching them by their routing decisions.

    The requests are prefilled in chunks of `max_batch` rows (all at once without it); each
    request's decisions are read from the gates; `group_rows(keep, policy, max_batch)` forms the
    batches; each batch continues from its rows of the prefill cache (the last prompt token is
    fed again, so `generate` and its logits processors run unchanged) with those decisions.
    `reuse_prefill=False` (automatic where the cache cannot be cut: sliding-window layers)
    instead takes the decisions from `decisions()` and prefills each batch again with them
    forced. Cost against plain batching: one more single-token step per batch (the re-fed
    token); peak cache memory: the prefill cache of all requests (twice while it is assembled)
    plus one batch's copy.

    `tokenizer` (or None) supplies the pad token id when `pad_token_id` is not given.
    `generate_kwargs` go to every `generate` call (do_sample, eos_token_id, ...); beam search
    and several sequences per request are refused. Sampling works, but batches draw from the
    random generator one after the other, so samples differ from one batched call.
    Returns (rows, prompt width + new tokens):
    `input_ids` followed by the new tokens, padded after an early stop, in the original order,
    as one `ms.generate` call on the whole batch returns it.
    """
    _check_model(ms)
    bad = {k: why for k, why in _REFUSED.items() if k in generate_kwargs
           and generate_kwargs[k] not in (None, False) and not (k.startswith("num_") and generate_kwargs[k] == 1)}
    if bad:
        raise ValueError("generate_grouped: unsupported generate arguments: "
                         + "; ".join(f"{k} ({why})" for k, why in bad.items()))
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pad = _pad_id(ms, tokenizer, generate_kwargs)
    kw = {k: v for k, v in generate_kwargs.items() if k not in _REFUSED}
    kw.update(max_new_tokens=max_new_tokens, pad_token_id=pad, num_beams=1, num_return_sequences=1)
    splittable = _can_split_cache(ms)
    if reuse_prefill and not splittable:
        raise ValueError("reuse_prefill=True needs a cache of plain DynamicLayers (no sliding-window layers)")
    reuse = splittable if reuse_prefill is None else bool(reuse_prefill)
    n = input_ids.shape[0]
    if reuse:
        kv, keep = _prefill(ms, input_ids, mask, max_batch or n)
    else:
        kv, keep = None, decisions(ms, input_ids, mask)
    batches = group_rows(keep, policy, max_batch)
    news = [_generate_rows(ms, input_ids, mask, torch.as_tensor(b), kw, kv, keep) for b in batches]
    return _assemble(input_ids, batches, news, pad)

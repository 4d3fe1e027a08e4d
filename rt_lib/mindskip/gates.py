"""The gates MindSkip puts around routed sublayers, and the routing context they share.

`SeqGate` takes one decision per sequence, `TokenGate` one per token; both derive from
`MindSkipGate` (router, forced decisions, execution mode, statistics). At `mlp` and `moe`
granularity the gated module is position-wise (a dense MLP, or a sparse MoE block with its
expert router and experts), so skipping it never touches the KV cache. A gate replaces the gated
module inside its decoder layer (the original kept as `base_layer`) and is transparent to code
that reads attributes of that module. `RoutingContext` is filled once per forward pass by a
pre-hook on the decoder (padding mask, cache, tokens already cached) and read by every gate.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from rt_lib.mindskip.architecture import sliding_window
from rt_lib.mindskip.config import KV_GRANULARITIES, MindSkipConfig

ROUTER_PREFIX = "mindskip_router"


class RoutingContext:
    """Filled by a forward pre-hook on the decoder before any layer runs."""

    def __init__(self):
        self.real: torch.Tensor | None = None  # (B, T) bool: real (non-padding) tokens of the current input
        self.past_len = 0  # tokens already in the cache before this call
        self.cache = None
        self.padded = False  # the current (prefill) input has padding tokens

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else emb
        bsz, q_len = ref.shape[0], ref.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.cache = cache
        self.past_len = int(cache.get_seq_length()) if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            self.real = mask[:, -q_len:].to(device=ref.device, dtype=torch.bool)
            # one host sync per forward (not per layer); decode steps reuse prefill decisions
            self.padded = self.past_len == 0 and not bool(self.real.all())
        else:
            self.real = torch.ones(bsz, q_len, dtype=torch.bool, device=ref.device)
            self.padded = False
        return None


def _take_rows(obj, rows: torch.Tensor, bsz: int):
    """Select batch rows in every tensor of (nested) call arguments whose first dim is the batch."""
    if isinstance(obj, torch.Tensor):
        return obj[rows] if obj.ndim >= 2 and obj.shape[0] == bsz else obj
    if isinstance(obj, tuple):
        return tuple(_take_rows(o, rows, bsz) for o in obj)
    if isinstance(obj, list):
        return [_take_rows(o, rows, bsz) for o in obj]
    if isinstance(obj, dict):
        return {k: _take_rows(v, rows, bsz) for k, v in obj.items()}
    return obj


def _masked_mean(v: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of v over the positions where m is True (keeps the autograd graph of v)."""
    m = m.to(v.dtype) if v.is_floating_point() else m.float()
    v = v if v.is_floating_point() else v.float()
    return (v * m).sum() / m.sum().clamp_min(1.0)


def _gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t: (B or 1, T, ...) -> (B, Tk, ...) at token indices idx (B, Tk)."""
    t = t.expand(idx.shape[0], *t.shape[1:])
    view = idx.view(*idx.shape, *([1] * (t.ndim - 2))).expand(*idx.shape, *t.shape[2:])
    return torch.gather(t, 1, view)


@dataclass
class _TokenHistory:
    """Key slots of one layer's cache under token routing: (B, S) time index and validity."""

    cache: weakref.ref
    time: torch.Tensor
    valid: torch.Tensor
    all_valid: bool = True  # every slot holds a key (known on the host: no sync to ask)


class MindSkipGate(nn.Module):
    """Wraps one sublayer (or block) of one decoder layer with a router.

    The common part of `SeqGate` (one decision per sequence) and `TokenGate` (one per token):
    the router, forced decisions, execution mode and statistics. Build one with `make_gate`.
    """

    def __init__(self, base_layer: nn.Module, layer: nn.Module, layer_idx: int, cfg: MindSkipConfig,
                 model_config, ctx: RoutingContext):
        super().__init__()
        self.base_layer = base_layer
        dtype = getattr(torch, cfg.router_dtype)
        ref_param = next(base_layer.parameters())
        router = nn.Linear(model_config.hidden_size, 1, bias=cfg.router_bias, device=ref_param.device, dtype=dtype)
        nn.init.zeros_(router.weight)
        if router.bias is not None:  # start at score router_init, away from the threshold
            p0 = cfg.router_init
            nn.init.constant_(router.bias, math.log(p0 / (1.0 - p0)))
        setattr(self, ROUTER_PREFIX, router)
        self.layer_idx = layer_idx
        self.granularity = cfg.granularity
        self.position_wise = cfg.granularity not in KV_GRANULARITIES  # mlp, moe: no keys/values involved
        self.route_level = cfg.route_level
        self.threshold = cfg.threshold
        self.forced: bool | None = None
        self.execution = "skip"
        self.attn_impl = getattr(model_config, "_attn_implementation", None)
        # not registered as submodules: they belong to the base layer
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_block_norm", layer.input_layernorm if cfg.granularity == "block" else None)
        self.sliding_window = sliding_window(layer, layer_idx, model_config)
        self.capacity: torch.Tensor | None = None
        self.last_keep: torch.Tensor | None = None
        # `moe` gates: the (B, T) token positions handed to the MoE block in the last forward pass
        # (row-major, the order of the expert router's rows); `rt_lib.mindskip.moe.ExpertTrace` reads it
        self.last_sent: torch.Tensor | None = None
        self.reset_stats()

    @property
    def router(self) -> nn.Linear:
        return getattr(self, ROUTER_PREFIX)

    def __getattr__(self, name):  # transparent to code that reads attributes of the wrapped module
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers"):
                raise
            return getattr(self._modules["base_layer"], name)

    def reset_stats(self):
        self.n_exec = 0.0
        self.n_total = 0.0

    # -- routing -------------------------------------------------------------------------
    def _scores(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Router score r in (0, 1): (B,) for a sequence gate, (B, T) for a token gate."""
        raise NotImplementedError

    def _hard(self, r: torch.Tensor) -> torch.Tensor:
        if isinstance(self.forced, torch.Tensor):  # per-row (or per-token) forced decisions
            f = self.forced.to(device=r.device, dtype=torch.bool)
            return (f.view(-1, *([1] * (r.ndim - 1))) if f.ndim == 1 else f).expand_as(r)
        if self.forced is not None:
            return torch.full_like(r, float(self.forced)).bool()
        return r >= self.threshold

    def _normed(self, x):
        return self._block_norm(x) if self._block_norm is not None else x

    # -- forward -------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        x = hidden_states
        bsz, q_len = x.shape[0], x.shape[1]
        real = self._ctx.real
        if real is None or real.shape != (bsz, q_len):
            real = torch.ones(bsz, q_len, dtype=torch.bool, device=x.device)
        return self.routed_forward(x, real, args, kwargs)

    def routed_forward(self, x, real, args, kwargs):
        """The routed computation: `x` (B, T, d), `real` (B, T) the non-padding tokens."""
        raise NotImplementedError

    def reorder_cache(self, cache, beam_idx: torch.Tensor) -> bool:
        """Follow a beam-search reorder of `cache` (row b becomes old row beam_idx[b]): reorder
        what this gate stores for the cache. True when the gate also reordered its layer's cache
        entry, False when the caller applies the stock reorder to it."""
        return False

    def _call(self, x, args, kwargs):
        if self.training and getattr(self.base_layer, "jitter_noise", 0):
            x = x.clone()  # Mixtral's router jitter scales its input in place; the router's graph keeps x
        out = self.base_layer(x, *args, **kwargs)
        return (out[0] if isinstance(out, tuple) else out), isinstance(out, tuple)

    def _wrap(self, out, was_tuple):
        return (out, None) if was_tuple else out

    def _skipped_output(self, x):
        return x if self.granularity == "block" else torch.zeros_like(x)

    def _apply_gate(self, x, out, g):
        """Sublayer output weighted by the decision g (hard 0/1, or straight-through)."""
        g = g.to(out.dtype).view(*g.shape, *([1] * (out.ndim - g.ndim)))
        return x + g * (out - x) if self.granularity == "block" else g * out

    def _sent(self, real: torch.Tensor, sent: torch.Tensor | None) -> None:
        """Note the (B, T) token positions an `moe` gate hands its block (None: all of them)."""
        if self.granularity == "moe":
            self.last_sent = torch.ones_like(real) if sent is None else sent

    def _record(self, hard, units):
        """Accumulate executed / total units (sequences or real tokens) without a host sync."""
        with torch.no_grad():
            self.last_keep = hard.detach()
            self.n_exec = self.n_exec + (hard & units).sum()
            self.n_total = self.n_total + units.sum()


class SeqGate(MindSkipGate):
    """One decision per sequence, taken at prefill from the real tokens and reused at every
    decode step; only the kept rows run the sublayer (and store keys/values at its layer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._seq_state: tuple[weakref.ref, torch.Tensor, torch.Tensor] | None = None  # (cache, keep, kept rows)

    def _scores(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(B,) scores from the mean of x over each row's real tokens (padding never counts)."""
        w = self.router.weight
        xs = x.to(w.dtype)
        if not self._ctx.padded and not self.training:
            return torch.sigmoid(self.router(xs.mean(1))).squeeze(-1)
        m = real.to(w.dtype).unsqueeze(-1)  # (B, T, 1): pool over real tokens only
        pooled = (xs * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, d)
        return torch.sigmoid(self.router(pooled)).squeeze(-1)

    def routed_forward(self, x, real, args, kwargs):
        ctx = self._ctx
        bsz = x.shape[0]
        cache = ctx.cache
        if self.training:
            rows_real = real.any(1)
            r = self._scores(self._normed(x), real)
            hard = self._hard(r)
            gate = hard.to(r.dtype) + r - r.detach()  # straight-through estimator
            self._sent(real, None)
            out, tup = self._call(x, args, kwargs)
            self.capacity = _masked_mean(gate, rows_real)
            self._record(hard, rows_real)
            return self._wrap(self._apply_gate(x, out, gate), tup)

        if cache is not None and ctx.past_len > 0:
            # decode / continuation: reuse the decision taken at prefill (cache rows depend on it)
            st = self._seq_state
            if st is None or st[0]() is not cache or st[1].shape[0] != bsz:
                raise RuntimeError(
                    f"MindSkip layer {self.layer_idx}: this cache was not prefilled by this MindSkip model "
                    "(no routing decision stored for it). Start generation from an empty cache."
                )
            _, hard, rows = st
        else:
            if isinstance(self.forced, bool):  # forced decisions: no router work, no host sync
                hard = torch.full((bsz,), self.forced, dtype=torch.bool, device=x.device)
                rows = torch.arange(bsz if self.forced else 0, device=x.device)
            else:
                with torch.no_grad():
                    hard = self._hard(self._scores(self._normed(x), real))
                rows = hard.nonzero().squeeze(-1)  # one host sync per prefill, none per decode step
            if cache is not None:
                self._seq_state = (weakref.ref(cache), hard, rows)
        # eval statistics as host integers: the kept rows are known on the host already
        self.capacity = None
        self.last_keep = hard
        self.n_exec += rows.numel()
        self.n_total += bsz
        n_keep = rows.numel()
        if self.execution == "mask" or (0 < n_keep < bsz and cache is not None
                                         and not _row_subset_cache(cache, self.layer_idx)):
            # compute-then-mask reference; or a preallocated (static) cache with a fixed batch
            self._sent(real, None)
            out, tup = self._call(x, args, kwargs)
            return self._wrap(self._apply_gate(x, out, hard), tup)
        if n_keep == bsz:
            self._sent(real, None)
            out, tup = self._call(x, args, kwargs)
            return self._wrap(out, tup)
        self._sent(real, hard.view(-1, 1).expand_as(real))
        if n_keep == 0:
            return self._wrap(self._skipped_output(x), self.granularity == "attn")
        sub, tup = self._call(x[rows], _take_rows(args, rows, bsz), _take_rows(kwargs, rows, bsz))
        out = self._skipped_output(x).clone()
        out[rows] = sub.to(out.dtype)  # autocast: the sublayer may return a lower precision
        return self._wrap(out, tup)

    def reorder_cache(self, cache, beam_idx: torch.Tensor) -> bool:
        """Reorder the stored decisions; where this layer's cache holds only the kept rows, pick
        the new rows' keys/values from their old slots (True), else leave it to the caller."""
        seq = self._seq_state
        if seq is None or seq[0]() is not cache:
            return False
        ref, hard, rows = seq
        idx = beam_idx.to(hard.device)
        new_hard = hard.index_select(0, idx)
        new_rows = new_hard.nonzero().squeeze(-1)
        self._seq_state = (ref, new_hard, new_rows)
        layer = getattr(cache, "layers", [None] * (self.layer_idx + 1))[self.layer_idx]
        keys = getattr(layer, "keys", None)
        if self.position_wise or not isinstance(keys, torch.Tensor) or keys.shape[0] == hard.shape[0]:
            return False  # the layer's cache holds every row (or none): the standard reorder applies
        # the cache holds the kept rows in batch order: old row r sits at slot (number kept before r)
        slot = torch.cumsum(hard.long(), 0) - 1
        take = slot.index_select(0, idx.index_select(0, new_rows)).to(keys.device)
        layer.keys = keys.index_select(0, take)
        layer.values = layer.values.index_select(0, take)
        return True


class TokenGate(MindSkipGate):
    """One decision per token; only kept tokens run the sublayer, compacted per row. At `attn`
    and `block` granularity a skipped token is never a key/value at this layer: the gate keeps
    the time index and validity of each cached key slot (`_TokenHistory`) and builds the mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tok_state: _TokenHistory | None = None

    def _scores(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(B, T) scores, one per token."""
        w = self.router.weight
        return torch.sigmoid(self.router(x.to(w.dtype))).squeeze(-1)

    def reorder_cache(self, cache, beam_idx: torch.Tensor) -> bool:
        """Reorder the per-row key history; the cache layer holds every row (stock reorder)."""
        st = self._tok_state
        if st is not None and st.cache() is cache:
            idx = beam_idx.to(st.time.device)
            st.time, st.valid = st.time.index_select(0, idx), st.valid.index_select(0, idx)
        return False

    def routed_forward(self, x, real, args, kwargs):
        bsz, q_len = x.shape[0], x.shape[1]
        ctx = self._ctx
        grad_mode = self.training
        if grad_mode:
            r = self._scores(self._normed(x), real)
        else:
            with torch.no_grad():
                r = self._scores(self._normed(x), real)
        hard = self._hard(r) & real  # padding never runs / never stored
        gate = hard.to(r.dtype) + r - r.detach() if grad_mode else hard
        self.capacity = _masked_mean(gate, real)
        self._record(hard, real)

        if self.position_wise:  # mlp, moe: no keys/values involved
            if grad_mode or self.execution == "mask":
                self._sent(real, None)
                out, tup = self._call(x, args, kwargs)
                return self._wrap(self._apply_gate(x, out, gate), tup)
            self._sent(real, hard)
            out = torch.zeros_like(x)
            if hard.any():  # the kept tokens of every row as one row: a skipped token reaches no expert
                out[hard] = self.base_layer(x[hard].unsqueeze(0)).squeeze(0).to(out.dtype)
            return out

        cache = ctx.cache
        if cache is not None and not _row_subset_cache(cache, self.layer_idx):
            raise NotImplementedError(
                "token routing stores a compacted key history per layer and needs a DynamicCache; "
                f"got {type(cache).__name__}. Use the default cache (no cache_implementation) or seq routing."
            )
        compute_all = grad_mode or self.execution == "mask"
        # queries: the tokens that go through the module, compacted per row
        sel = real if compute_all else hard
        hist = self._history(cache, bsz, x.device)
        time_now = ctx.past_len + torch.arange(q_len, device=x.device).expand(bsz, q_len)
        if not compute_all and not sel.any():
            return self._wrap(self._skipped_output(x), self.granularity == "attn")
        t_min, t_k = sel.sum(1).aminmax()
        t_k, t_min = int(t_k), int(t_min)  # one host sync
        if t_k == t_min == q_len:  # every token of every row goes through: nothing to gather
            order, sub_x, kw = None, x, dict(kwargs)
            q_time, k_valid_new = time_now, (hard if compute_all else sel)
        else:
            # per row: filler slots (marked invalid) first, then the selected tokens in time order,
            # so the valid keys of a row always occupy its newest cache slots; a sliding-window
            # cache, which keeps only the newest slots, then never drops a valid key in the window
            order = torch.argsort(sel.to(torch.int8), dim=1, stable=True)[:, q_len - t_k:]  # (B, Tk)
            q_time = torch.gather(time_now, 1, order)
            k_valid_new = torch.gather(hard, 1, order) & torch.gather(sel, 1, order)  # skipped: no key
            sub_x, kw = self._gather_call_inputs(x, kwargs, order)
        new_all_valid = not compute_all and t_min == t_k  # no filler slot, no skipped token stored
        kw["attention_mask"] = self._key_mask(hist, q_time, k_valid_new, new_all_valid, t_k, x)
        sub, tup = self._call(sub_x, args, kw)
        self._extend_history(cache, hist, q_time, k_valid_new, new_all_valid)
        if order is None:
            out = sub
        else:
            out = x.clone() if self.granularity == "block" else torch.zeros_like(x)
            if t_min == t_k:  # no filler slot: every computed token goes back to its place
                out.scatter_(1, order.unsqueeze(-1).expand_as(sub), sub.to(out.dtype))
            else:
                b_idx, j_idx = torch.gather(sel, 1, order).nonzero(as_tuple=True)
                out[b_idx, order[b_idx, j_idx]] = sub[b_idx, j_idx].to(out.dtype)
        if compute_all:  # every real token was computed: apply the (straight-through) decision
            out = self._apply_gate(x, out, gate)
        return self._wrap(out, tup)

    @staticmethod
    def _gather_call_inputs(x, kwargs, order):
        """The sublayer's input and keyword arguments at the selected tokens ``order`` (B, Tk)."""
        kw = dict(kwargs)
        pe = kw.get("position_embeddings")
        if pe is not None:
            kw["position_embeddings"] = tuple(_gather_tokens(p, order) for p in pe)
        if isinstance(kw.get("position_ids"), torch.Tensor):
            kw["position_ids"] = _gather_tokens(kw["position_ids"], order)
        return _gather_tokens(x, order), kw

    def _key_mask(self, hist, q_time, k_valid_new, new_all_valid: bool, t_k: int, x):
        """The attention mask of the compacted queries over the layer's keys (cached + new).

        None (the attention's own causal path, and its fastest kernel) where that is the same
        mask: SDPA, every key slot valid, no sliding window cutting in, and either no cached
        keys (causal over the kept tokens in time order) or one query per row (sees every key)."""
        past = 0 if hist is None else hist.time.shape[1]
        span = int(self._ctx.past_len) + int(x.shape[1])  # newest time index + 1
        if (self.attn_impl == "sdpa" and new_all_valid and (hist is None or hist.all_valid)
                and (not self.sliding_window or span <= self.sliding_window) and (past == 0 or t_k == 1)):
            return None
        k_time = torch.cat([hist.time, q_time], 1) if hist is not None else q_time
        k_valid = torch.cat([hist.valid, k_valid_new], 1) if hist is not None else k_valid_new
        allowed = k_valid[:, None, :] & (k_time[:, None, :] <= q_time[:, :, None])  # (B, Tk, S+Tk)
        if self.sliding_window:
            allowed &= k_time[:, None, :] > q_time[:, :, None] - self.sliding_window
        eye = torch.zeros_like(allowed)
        eye[:, :, past:] = torch.eye(t_k, dtype=torch.bool, device=x.device)
        allowed = (allowed | eye).unsqueeze(1)  # every query sees at least itself: no empty softmax rows
        if self.attn_impl != "eager":
            return allowed
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        return mask.masked_fill_(~allowed, torch.finfo(x.dtype).min)

    def _history(self, cache, bsz, device) -> _TokenHistory | None:
        ctx = self._ctx
        if cache is None:
            return None
        if ctx.past_len == 0:
            self._tok_state = _TokenHistory(weakref.ref(cache), torch.zeros(bsz, 0, dtype=torch.long, device=device),
                                            torch.zeros(bsz, 0, dtype=torch.bool, device=device))
        st = self._tok_state
        if st is None or st.cache() is not cache or st.time.shape[0] != bsz:
            raise RuntimeError(
                f"MindSkip layer {self.layer_idx}: this cache was not prefilled by this MindSkip model "
                "(no token history stored for it). Start generation from an empty cache."
            )
        return st

    def _extend_history(self, cache, hist, q_time, k_valid_new, new_all_valid: bool):
        if hist is None:
            return
        hist.time = torch.cat([hist.time, q_time], 1)
        hist.valid = torch.cat([hist.valid, k_valid_new], 1)
        hist.all_valid = hist.all_valid and new_all_valid
        stored = _stored_len(cache, self.layer_idx)
        if stored is not None and stored < hist.time.shape[1]:  # sliding-window caches drop old slots
            hist.time = hist.time[:, -stored:]
            hist.valid = hist.valid[:, -stored:]


def _row_subset_cache(cache, layer_idx) -> bool:
    """True when the layer's cache grows by concatenation (DynamicCache layers), so it can hold
    a subset of the batch rows or a compacted token history."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return True
    return isinstance(layers[layer_idx], DynamicLayer)


def _stored_len(cache, layer_idx) -> int | None:
    """Number of key slots the cache holds for a layer (None when unknown or empty)."""
    try:
        keys = getattr(cache.layers[layer_idx], "keys", None)
    except (AttributeError, IndexError):
        return None
    return keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.ndim >= 3 else None


def make_gate(base_layer: nn.Module, layer: nn.Module, layer_idx: int, cfg: MindSkipConfig, model_config,
              ctx: RoutingContext) -> MindSkipGate:
    """The gate of `cfg.route_level` around `base_layer` (a sublayer of `layer`, or `layer` itself)."""
    cls = SeqGate if cfg.route_level == "seq" else TokenGate
    return cls(base_layer, layer, layer_idx, cfg, model_config, ctx)

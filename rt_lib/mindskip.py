"""MindSkip: routers that gate the sublayers of a Hugging Face decoder and really skip them.

A router is `Linear(hidden_size, 1, bias=False)`, zero-initialised, reading the normalised
input of the gated sublayer; score `r = sigmoid(w . x)`, keep when `r >= threshold`
(README, "MindSkip in five lines"; API in docs/core_api.md). The wrapper replaces a module of each routed decoder
layer in place (PEFT style, the original kept as `base_layer`):

    granularity  wrapped module         router input                    skipped output
    attn         layer.self_attn        input_layernorm(h) (its input)  zeros  (h unchanged)
    mlp          layer.mlp              the MLP's own normalised input  zeros  (h unchanged)
    block        the decoder layer      layer.input_layernorm(h)        h

Returning zeros from a skipped attention/MLP is exact for every supported architecture:
the residual add (Llama, Mistral, Qwen, Phi3) or the post-norm + add (Gemma: RMSNorm(0) = 0)
leaves `h` unchanged.

Execution modes (eval):
- `skip` (default): a skipped sublayer is not computed. With `seq` routing only the kept rows
  of a batch go through it, so the KV cache of that layer stores keys/values for the kept rows
  only; the decision is taken at prefill and reused for every decode step, so the cache rows
  stay aligned. With `token` routing only the kept tokens go through it (compacted per row);
  a skipped token contributes nothing as key/value at that layer (Mixture-of-Depths style):
  it is never stored in the cache and no later token attends to it. Cached and uncached runs
  agree because the per-layer key history (time index + validity of each cached slot) is kept
  beside the cache and the attention mask is rebuilt from it.
- `mask`: compute every row/token, then multiply by the decision: the reference that saves
  nothing (what a compute-then-mask implementation does).
Beam search: the model's first forward pass on a new cache makes `cache.reorder_cache` reorder
the gates' stored decisions, kept rows and key histories with the beams (`_follow_reorders`).
Training (`ms.train()`): hard decisions in the forward pass, full compute, straight-through
gradient `m = hard + r - r.detach()` to the router score; capacities are differentiable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import MindSkipConfig

logger = logging.getLogger(__name__)

ROUTER_PREFIX = "mindskip_router"
CHECKPOINT_FORMAT = "rt-kit-mindskip-routers"
CHECKPOINT_VERSION = 1
WEIGHTS_NAME = "routers.safetensors"
CONFIG_NAME = "mindskip_config.json"
REQUIRED_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


# ----------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------
def find_decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module owning the decoder layers and the layer list, or a clear error."""
    candidates = []
    inner = getattr(model, "model", None)
    if inner is not None:
        candidates.append(inner)
        if getattr(inner, "language_model", None) is not None:
            candidates.append(inner.language_model)
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except Exception:  # noqa: BLE001 - some models raise here; the other candidates remain
            pass
    candidates.append(model)
    for dec in candidates:
        layers = getattr(dec, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return dec, layers
    raise ValueError(
        f"{type(model).__name__} is not a supported decoder: no `model.layers` ModuleList found. "
        "MindSkip supports Llama-shaped causal LMs (Llama, Mistral, Qwen2/3, Gemma2/3, Phi3, ...)."
    )


def check_architecture(model: nn.Module) -> None:
    _, layers = find_decoder(model)
    for i, layer in enumerate(layers):
        base = layer.base_layer if isinstance(layer, MindSkipGate) else layer
        missing = [p for p in REQUIRED_LAYER_PARTS if not hasattr(base, p)]
        if missing:
            raise ValueError(
                f"{type(model).__name__}: decoder layer {i} ({type(base).__name__}) lacks {missing}. MindSkip needs "
                f"Llama-shaped layers with {list(REQUIRED_LAYER_PARTS)}."
            )
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa"):
        logger.warning("attention implementation %r: seq routing works; token routing needs eager or sdpa", impl)


def cache_reference_layers(model: nn.Module) -> set[int]:
    """Layers whose cache length Hugging Face reads (sequence length, mask sizes).

    Layer 0 gives `cache.get_seq_length()`; the first full-attention layer gives the mask
    sizes. Skipping their attention would leave those caches empty, so they cannot be routed
    at `attn`/`block` granularity.
    """
    ref = {0}
    types = getattr(model.config, "layer_types", None)
    if types:
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        if full:
            ref.add(full[0])
    return ref


def routed_layers_for(model: nn.Module, config: MindSkipConfig) -> list[int]:
    """The layers `config` routes in `model`.

    The default range (the `num_routed_layers` deepest layers except the last) leaves out, at
    `attn`/`block` granularity, the layers Hugging Face reads the cache length from
    (`cache_reference_layers`) and logs their indices; an explicit `routed_layers` list naming
    one of them is an error.
    """
    _, layers = find_decoder(model)
    ref = cache_reference_layers(model) if config.granularity != "mlp" else set()
    if config.routed_layers is not None:
        routed = config.resolve_layers(len(layers))
        bad = sorted(ref & set(routed))
        if bad:
            raise ValueError(
                f"layers {bad} cannot be routed at {config.granularity!r} granularity: Hugging Face reads the "
                "cache length from them (layer 0 and the first full-attention layer). Route other layers."
            )
        return routed
    routed = config.resolve_layers(len(layers), exclude=ref)
    full = config.resolve_layers(len(layers))
    left_out = sorted(set(full) - set(routed))
    if left_out:
        logger.warning("MindSkip: default routed layers leave out %s (Hugging Face reads the cache length from them); "
                    "routing %d layers: %s", left_out, len(routed), routed)
    return routed


def _sliding_window(layer: nn.Module, layer_idx: int, config) -> int | None:
    """The attention window of decoder layer `layer_idx`, or None for full attention.

    Models with per-layer types (Gemma2/3, Qwen2/3) keep it on the attention module or mark the
    layer `sliding_attention`; Mistral and Phi3 apply `config.sliding_window` to every layer.
    """
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(attn, "sliding_window"):
        return attn.sliding_window or None
    types = getattr(config, "layer_types", None)
    if types:
        return getattr(config, "sliding_window", None) if types[layer_idx] == "sliding_attention" else None
    return getattr(config, "sliding_window", None) or None


_SLOT = {"attn": "self_attn", "mlp": "mlp"}  # block granularity: the decoder layer itself


def _get_slot(layers: nn.ModuleList, i: int, granularity: str) -> nn.Module:
    """The module of layer i that `granularity` gates (or removes)."""
    return layers[i] if granularity == "block" else getattr(layers[i], _SLOT[granularity])


def _set_slot(layers: nn.ModuleList, i: int, granularity: str, module: nn.Module) -> None:
    if granularity == "block":
        layers[i] = module
    else:
        setattr(layers[i], _SLOT[granularity], module)


# ----------------------------------------------------------------------------------------
# Shared routing context: what the gates need from the top-level call
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# The gate
# ----------------------------------------------------------------------------------------
class MindSkipGate(nn.Module):
    """Wraps one sublayer (or block) of one decoder layer with a router."""

    def __init__(self, base_layer: nn.Module, layer: nn.Module, layer_idx: int, cfg: MindSkipConfig,
                 model_config, ctx: RoutingContext):
        super().__init__()
        self.base_layer = base_layer
        dtype = getattr(torch, cfg.router_dtype)
        ref_param = next(base_layer.parameters())
        router = nn.Linear(model_config.hidden_size, 1, bias=False, device=ref_param.device, dtype=dtype)
        nn.init.zeros_(router.weight)
        setattr(self, ROUTER_PREFIX, router)
        self.layer_idx = layer_idx
        self.granularity = cfg.granularity
        self.route_level = cfg.route_level
        self.threshold = cfg.threshold
        self.forced: bool | None = None
        self.execution = "skip"
        self.attn_impl = getattr(model_config, "_attn_implementation", None)
        # not registered as submodules: they belong to the base layer
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_block_norm", layer.input_layernorm if cfg.granularity == "block" else None)
        self.sliding_window = _sliding_window(layer, layer_idx, model_config)
        self._seq_state: tuple[weakref.ref, torch.Tensor, torch.Tensor] | None = None  # (cache, keep, kept rows)
        self._tok_state: _TokenHistory | None = None
        self.capacity: torch.Tensor | None = None
        self.last_keep: torch.Tensor | None = None
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
        """Router score r in (0, 1): (B,) for seq routing, (B, T) for token routing."""
        w = self.router.weight
        xs = x.to(w.dtype)
        if self.route_level == "seq":
            if not self._ctx.padded and not self.training:
                return torch.sigmoid(self.router(xs.mean(1))).squeeze(-1)
            m = real.to(w.dtype).unsqueeze(-1)  # (B, T, 1): pool over real tokens only
            pooled = (xs * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, d)
            return torch.sigmoid(self.router(pooled)).squeeze(-1)
        return torch.sigmoid(self.router(xs)).squeeze(-1)

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
        ctx = self._ctx
        x = hidden_states
        bsz, q_len = x.shape[0], x.shape[1]
        real = ctx.real
        if real is None or real.shape != (bsz, q_len):
            real = torch.ones(bsz, q_len, dtype=torch.bool, device=x.device)
        if self.route_level == "seq":
            return self._forward_seq(x, real, args, kwargs)
        return self._forward_token(x, real, args, kwargs)

    def _call(self, x, args, kwargs):
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

    def _forward_seq(self, x, real, args, kwargs):
        ctx = self._ctx
        bsz = x.shape[0]
        cache = ctx.cache
        if self.training:
            rows_real = real.any(1)
            r = self._scores(self._normed(x), real)
            hard = self._hard(r)
            gate = hard.to(r.dtype) + r - r.detach()  # straight-through estimator
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
            out, tup = self._call(x, args, kwargs)
            return self._wrap(self._apply_gate(x, out, hard), tup)
        if n_keep == bsz:
            out, tup = self._call(x, args, kwargs)
            return self._wrap(out, tup)
        if n_keep == 0:
            return self._wrap(self._skipped_output(x), self.granularity == "attn")
        sub, tup = self._call(x[rows], _take_rows(args, rows, bsz), _take_rows(kwargs, rows, bsz))
        out = self._skipped_output(x).clone()
        out[rows] = sub
        return self._wrap(out, tup)

    # -- beam search ---------------------------------------------------------------------
    def reorder_cache(self, cache, beam_idx: torch.Tensor) -> bool:
        """Follow a beam-search reorder of `cache` (row b becomes old row beam_idx[b]).

        Reorders the decisions and key history stored for this cache. Returns True when this
        gate also reordered its layer's cache (its rows are a subset of the batch under `seq`
        routing), False when the cache layer holds every row and the caller reorders it.
        """
        if self._tok_state is not None and self._tok_state.cache() is cache:
            st = self._tok_state
            idx = beam_idx.to(st.time.device)
            st.time, st.valid = st.time.index_select(0, idx), st.valid.index_select(0, idx)
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
        if self.granularity == "mlp" or not isinstance(keys, torch.Tensor) or keys.shape[0] == hard.shape[0]:
            return False  # the layer's cache holds every row (or none): the standard reorder applies
        # the cache holds the kept rows in batch order: old row r sits at slot (number kept before r)
        slot = torch.cumsum(hard.long(), 0) - 1
        take = slot.index_select(0, idx.index_select(0, new_rows)).to(keys.device)
        layer.keys = keys.index_select(0, take)
        layer.values = layer.values.index_select(0, take)
        return True

    def _record(self, hard, units):
        """Accumulate executed / total units (sequences or real tokens) without a host sync."""
        with torch.no_grad():
            self.last_keep = hard.detach()
            self.n_exec = self.n_exec + (hard & units).sum()
            self.n_total = self.n_total + units.sum()

    # -- token routing ---------------------------------------------------------------------
    def _forward_token(self, x, real, args, kwargs):
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

        if self.granularity == "mlp":  # position-wise: no keys/values involved
            if grad_mode or self.execution == "mask":
                out, tup = self._call(x, args, kwargs)
                return self._wrap(self._apply_gate(x, out, gate), tup)
            out = torch.zeros_like(x)
            if hard.any():
                out[hard] = self.base_layer(x[hard].unsqueeze(0)).squeeze(0)
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
        n_sel = sel.sum(1)
        t_k = int(n_sel.max())
        # per row: filler slots (marked invalid) first, then the selected tokens in time order, so
        # the valid keys of a row always occupy its newest cache slots; a sliding-window cache,
        # which keeps only the newest slots, then never drops a valid key still inside the window
        order = torch.argsort(sel.to(torch.int8), dim=1, stable=True)[:, q_len - t_k:]  # (B, Tk)
        q_valid = torch.gather(sel, 1, order)
        q_time = torch.gather(time_now, 1, order)
        k_valid_new = torch.gather(hard, 1, order) & q_valid  # skipped tokens are not keys
        sub_x = _gather_tokens(x, order)
        kw = dict(kwargs)
        pe = kw.get("position_embeddings")
        if pe is not None:
            kw["position_embeddings"] = tuple(_gather_tokens(p, order) for p in pe)
        if isinstance(kw.get("position_ids"), torch.Tensor):
            kw["position_ids"] = _gather_tokens(kw["position_ids"], order)
        k_time = torch.cat([hist.time, q_time], 1) if hist is not None else q_time
        k_valid = torch.cat([hist.valid, k_valid_new], 1) if hist is not None else k_valid_new
        allowed = k_valid[:, None, :] & (k_time[:, None, :] <= q_time[:, :, None])  # (B, Tk, S+Tk)
        if self.sliding_window:
            allowed &= k_time[:, None, :] > q_time[:, :, None] - self.sliding_window
        n_past = k_time.shape[1] - t_k
        eye = torch.zeros_like(allowed)
        eye[:, :, n_past:] = torch.eye(t_k, dtype=torch.bool, device=x.device)
        allowed = (allowed | eye).unsqueeze(1)  # every query sees at least itself: no empty softmax rows
        if self.attn_impl == "eager":
            mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
            mask.masked_fill_(~allowed, torch.finfo(x.dtype).min)
        else:
            mask = allowed
        kw["attention_mask"] = mask
        sub, tup = self._call(sub_x, args, kw)
        self._extend_history(cache, hist, q_time, k_valid_new)
        out = self._skipped_output(x).clone()
        b_idx, j_idx = q_valid.nonzero(as_tuple=True)
        out[b_idx, order[b_idx, j_idx]] = sub[b_idx, j_idx]
        if compute_all:  # every real token was computed: apply the (straight-through) decision
            out = self._apply_gate(x, out, gate)
        return self._wrap(out, tup)

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

    def _extend_history(self, cache, hist, q_time, k_valid_new):
        if hist is None:
            return
        hist.time = torch.cat([hist.time, q_time], 1)
        hist.valid = torch.cat([hist.valid, k_valid_new], 1)
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


# ----------------------------------------------------------------------------------------
# The model handle
# ----------------------------------------------------------------------------------------
def _base_model_name(model) -> str:
    cfg = model.config
    return getattr(cfg, "rt_kit_name", None) or getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", "") or ""


class MindSkipModel(nn.Module):
    """A Hugging Face causal LM with MindSkip routers inside it (see module docstring)."""

    def __init__(self, model: nn.Module, config: MindSkipConfig):
        super().__init__()
        check_architecture(model)
        if any(isinstance(m, MindSkipGate) for m in model.modules()):
            raise ValueError("this model already has MindSkip routers attached; call unload() first")
        self.model = model
        self.config = config
        decoder, layers = find_decoder(model)
        self.routed_layers = routed_layers_for(model, config)
        self._ctx = RoutingContext()
        self._hook = decoder.register_forward_pre_hook(self._before_decoder, with_kwargs=True)
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self._layers = layers
        self._gates: dict[int, MindSkipGate] = {}
        for i in self.routed_layers:
            gate = MindSkipGate(_get_slot(layers, i, config.granularity), layers[i], i, config, model.config, self._ctx)
            _set_slot(layers, i, config.granularity, gate)
            self._gates[i] = gate
        self.model.train(model.training)

    # -- delegation ------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def _before_decoder(self, module, args, kwargs):
        self._ctx.hook(module, args, kwargs)
        cache = self._ctx.cache
        if cache is not None and self._ctx.past_len == 0:
            self._follow_reorders(cache)
        return None

    def _follow_reorders(self, cache) -> None:
        """Make `cache.reorder_cache` (called by beam search) reorder what the gates store too.

        Under `seq` routing a routed layer's cache holds only the kept rows, so the stock
        reorder (index rows 0..B-1 of every layer) would fail or pick wrong rows; token routing
        keeps a key history per row beside the cache, which must follow the rows."""
        owner = getattr(cache, "_mindskip_reorder_owner", None)
        if (owner is not None and owner() is self) or not isinstance(getattr(cache, "layers", None), list):
            return
        model_ref = weakref.ref(self)

        def reorder_cache(beam_idx: torch.Tensor) -> None:
            ms = model_ref()
            gates = ms._gates if ms is not None else {}
            done = {i for i, g in gates.items() if g.reorder_cache(cache, beam_idx)}
            for i, layer in enumerate(cache.layers):
                if i not in done:
                    layer.reorder_cache(beam_idx)

        cache.reorder_cache = reorder_cache
        cache._mindskip_reorder_owner = model_ref

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def gates(self) -> dict[int, MindSkipGate]:
        return dict(self._gates)

    def routers(self) -> dict[int, nn.Linear]:
        return {i: g.router for i, g in self._gates.items()}

    def router_parameters(self) -> list[nn.Parameter]:
        return [g.router.weight for g in self._gates.values()]

    def set_threshold(self, threshold: float) -> None:
        self.config.threshold = float(threshold)
        for g in self._gates.values():
            g.threshold = float(threshold)

    def force(self, decisions=None) -> None:
        """None: routers decide; True/False: keep/skip every routed layer; {layer: bool}: per layer.

        A per-layer value may also be a bool tensor of shape (B,) (per sequence) or (B, T)
        (per token) to replay recorded decisions."""
        if isinstance(decisions, dict):
            unknown = sorted(set(decisions) - set(self._gates))
            if unknown:
                raise ValueError(f"layers {unknown} are not routed; routed layers: {self.routed_layers}")
            for i, g in self._gates.items():
                v = decisions.get(i)
                g.forced = v if v is None or isinstance(v, torch.Tensor) else bool(v)
        else:
            for g in self._gates.values():
                g.forced = None if decisions is None else bool(decisions)

    def set_execution(self, mode: str) -> None:
        if mode not in ("skip", "mask"):
            raise ValueError(f"execution mode must be 'skip' or 'mask', got {mode!r}")
        for g in self._gates.values():
            g.execution = mode

    # -- statistics and the regulariser -------------------------------------------------------
    def capacities(self) -> dict[int, torch.Tensor]:
        """Executed fraction of each routed layer in the last forward pass (differentiable in
        training; in eval computed here from the last decisions)."""
        out = {}
        for i, g in self._gates.items():
            if g.capacity is not None:
                out[i] = g.capacity
            elif g.last_keep is not None:
                out[i] = g.last_keep.float().mean()
        return out

    def regularizer(self) -> torch.Tensor:
        caps = list(self.capacities().values())
        if not caps:
            return torch.zeros((), device=self.device)
        s = self.config.capacity_target
        return self.config.reg_lambda * sum(torch.relu(c - s) for c in caps)

    def reset_stats(self) -> None:
        for g in self._gates.values():
            g.reset_stats()

    def skip_stats(self) -> dict[int, float]:
        """Executed fraction per routed layer since the last reset (NaN if nothing ran)."""
        return {i: (float(g.n_exec) / float(g.n_total) if float(g.n_total) else float("nan"))
                for i, g in self._gates.items()}

    def skip_ratio(self) -> float:
        tot = sum(float(g.n_total) for g in self._gates.values())
        return 1.0 - sum(float(g.n_exec) for g in self._gates.values()) / tot if tot else float("nan")

    def decisions(self) -> dict[int, torch.Tensor]:
        """Last keep decisions per layer: (B,) for seq routing, (B, T) for token routing."""
        return {i: g.last_keep for i, g in self._gates.items()}

    # -- detach --------------------------------------------------------------------------
    def unload(self) -> nn.Module:
        """Remove routers and hooks; return the base model exactly as it was."""
        for i, g in self._gates.items():
            _set_slot(self._layers, i, self.config.granularity, g.base_layer)
        self._hook.remove()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        self._gates = {}
        return self.model

    @contextlib.contextmanager
    def detached(self):
        """Within the block `ms.model` is the plain base model (same weights, gates taken out);
        the gates return on exit. For timing the dense model on exactly the same tensors."""
        for i, g in self._gates.items():
            _set_slot(self._layers, i, self.config.granularity, g.base_layer)
        try:
            yield self.model
        finally:
            for i, g in self._gates.items():
                _set_slot(self._layers, i, self.config.granularity, g)

    # -- save / load ---------------------------------------------------------------------------
    def router_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.router.weight": g.router.weight.detach().cpu().contiguous() for i, g in self._gates.items()}

    def checkpoint_metadata(self) -> dict:
        import transformers

        from . import __version__

        mc = self.model.config
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "config": self.config.to_dict(),
            "routed_layers": self.routed_layers,
            "base_model": _base_model_name(self.model),
            "model_type": getattr(mc, "model_type", None),
            "num_layers": len(self._layers),
            "hidden_size": mc.hidden_size,
            "rt_kit_version": __version__,
            "transformers_version": transformers.__version__,
        }

    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.router_state_dict(), str(path / WEIGHTS_NAME), metadata={"format": CHECKPOINT_FORMAT})
        meta = self.checkpoint_metadata()
        meta["weights_sha256"] = hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | Path, strict_base: bool = True, **overrides) -> "MindSkipModel":
        """Attach routers saved by `save_pretrained` to `model`, after checking that they fit it.

        `overrides` replace config fields (e.g. `threshold=0.6`). `strict_base=False` accepts a
        base model whose recorded name differs (same architecture and shapes are still required).
        """
        meta = read_checkpoint_metadata(path)
        _, layers = find_decoder(model)
        mc = model.config
        problems = []
        if meta["num_layers"] != len(layers):
            problems.append(f"it has {meta['num_layers']} layers, this model {len(layers)}")
        if meta["hidden_size"] != mc.hidden_size:
            problems.append(f"hidden size {meta['hidden_size']} vs {mc.hidden_size}")
        if meta.get("model_type") and meta["model_type"] != getattr(mc, "model_type", None):
            problems.append(f"model type {meta['model_type']!r} vs {getattr(mc, 'model_type', None)!r}")
        name = _base_model_name(model)
        if strict_base and meta.get("base_model") and name and _short(meta["base_model"]) != _short(name):
            problems.append(f"base model {meta['base_model']!r} vs {name!r} (pass strict_base=False if this is intended)")
        if problems:
            raise ValueError(f"router checkpoint {path} does not fit this model: " + "; ".join(problems))
        cfg = MindSkipConfig.from_dict({**meta["config"], **overrides})
        _check_weights_digest(Path(path), meta)
        weights = _read_router_weights(Path(path))
        ms = cls(model, cfg)
        expected = ms.router_state_dict()
        missing = sorted(set(expected) - set(weights))
        extra = sorted(set(weights) - set(expected))
        if missing or extra:
            ms.unload()
            raise ValueError(f"router checkpoint {path}: missing keys {missing}, unexpected keys {extra}")
        for k, t in weights.items():
            if tuple(t.shape) != tuple(expected[k].shape):
                ms.unload()
                raise ValueError(f"router checkpoint {path}: {k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
        with torch.no_grad():
            for i, g in ms._gates.items():
                g.router.weight.copy_(weights[f"layers.{i}.router.weight"].to(g.router.weight.dtype))
        return ms


def _short(name: str) -> str:
    return str(name).rstrip("/").split("/")[-1].lower()


def read_checkpoint_metadata(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir() or not cfg_file.is_file() or not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{path} is not a router checkpoint folder: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(written by MindSkipModel.save_pretrained)"
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); the router checkpoint is corrupt") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an rt-kit router checkpoint ({CONFIG_NAME} has no format {CHECKPOINT_FORMAT!r})")
    if meta.get("format_version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path} was written by a newer rt-kit (format {meta['format_version']}); upgrade rt-kit")
    for key in ("config", "num_layers", "hidden_size"):
        if key not in meta:
            raise ValueError(f"{cfg_file} lacks {key!r}; the router checkpoint is corrupt")
    return meta


def _check_weights_digest(path: Path, meta: dict) -> None:
    """The weights file must be the one `save_pretrained` wrote beside this config."""
    recorded = meta.get("weights_sha256")
    weights = path / WEIGHTS_NAME
    if recorded is None:
        logger.warning("%s records no weights_sha256: %s is loaded unverified", path / CONFIG_NAME, weights)
        return
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    if actual != recorded:
        raise ValueError(
            f"{weights} does not match its checkpoint: sha256 {actual[:12]}... but {CONFIG_NAME} records "
            f"{recorded[:12]}... The weights file was replaced or damaged after saving. Restore the original "
            "file, or re-save the routers with MindSkipModel.save_pretrained (which writes both files)."
        )


def _read_router_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path / WEIGHTS_NAME} is not a readable safetensors file ({e}); re-save the routers") from e


def get_mindskip_model(model: nn.Module, config: MindSkipConfig | None = None) -> MindSkipModel:
    """Attach zero-initialised MindSkip routers to `model` (in place); the base is frozen."""
    return MindSkipModel(model, config or MindSkipConfig())


# ----------------------------------------------------------------------------------------
# Physically removed sublayers (the oracle of profiling, the static-drop baseline)
# ----------------------------------------------------------------------------------------
class _Removed(nn.Module):
    """Stands in for a removed sublayer: computes nothing, stores no keys/values."""

    def __init__(self, kind: str, original: nn.Module):
        super().__init__()
        self.kind = kind
        object.__setattr__(self, "_original", original)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)

    def forward(self, hidden_states, *args, **kwargs):
        if self.kind == "block":
            return hidden_states
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.kind == "attn" else out


class DroppedLayers:
    """Handle returned by `drop_sublayers`; `restore()` puts the original modules back."""

    def __init__(self, model, layers, granularity, originals):
        self.model, self.layers, self.granularity, self._originals = model, layers, granularity, originals

    def restore(self) -> nn.Module:
        _, mlist = find_decoder(self.model)
        for i, orig in self._originals.items():
            _set_slot(mlist, i, self.granularity, orig)
        self._originals = {}
        return self.model


def drop_sublayers(model: nn.Module, layers, granularity: str = "attn") -> DroppedLayers:
    """Remove the `granularity` sublayer of each layer in `layers` from `model` (in place)."""
    check_architecture(model)
    _, mlist = find_decoder(model)
    layers = sorted({int(i) for i in layers})
    bad = [i for i in layers if not 0 <= i < len(mlist)]
    if bad:
        raise ValueError(f"layers {bad} do not exist (model has {len(mlist)})")
    if granularity not in ("attn", "mlp", "block"):
        raise ValueError(f"granularity must be attn, mlp or block, got {granularity!r}")
    if granularity != "mlp":
        ref = sorted(cache_reference_layers(model) & set(layers))
        if ref:
            raise ValueError(f"layers {ref} hold the cache length Hugging Face reads; they cannot be dropped")
    originals = {}
    for i in layers:
        originals[i] = _get_slot(mlist, i, granularity)
        _set_slot(mlist, i, granularity, _Removed(granularity, originals[i]))
    return DroppedLayers(model, layers, granularity, originals)

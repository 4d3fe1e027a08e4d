"""Physically removed sublayers: the oracle of profiling and the static-drop baseline.

`drop_sublayers(model, layers, granularity)` replaces the gated module of each listed layer by
a stand-in that computes nothing and stores no keys/values (what a skipped sublayer would
ideally cost; at `moe` granularity the whole sparse block, expert router, experts and any shared
expert, returns zeros); `restore()` puts the originals back.
"""

from __future__ import annotations

import torch
from torch import nn

from rt_lib.mindskip.architecture import cache_reference_layers, check_architecture, find_decoder, get_slot, set_slot
from rt_lib.mindskip.config import GRANULARITIES, KV_GRANULARITIES
from rt_lib.mindskip.moe import moe_layers


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
            set_slot(mlist, i, self.granularity, orig)
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
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity in KV_GRANULARITIES:
        ref = sorted(cache_reference_layers(model) & set(layers))
        if ref:
            raise ValueError(f"layers {ref} hold the cache length Hugging Face reads; they cannot be dropped")
    if granularity == "moe":
        dense = sorted(set(layers) - set(moe_layers(mlist)))
        if dense:
            raise ValueError(f"layers {dense} have no sparse MoE block to drop; drop their dense MLP with granularity 'mlp'")
    originals = {}
    for i in layers:
        originals[i] = get_slot(mlist, i, granularity)
        set_slot(mlist, i, granularity, _Removed(granularity, originals[i]))
    return DroppedLayers(model, layers, granularity, originals)

"""Held-out evaluation of a tuning run: the LM loss on sequences not used for tuning, with the
routers forced dense (the base model) or deciding, plus what the routers did there.

``evaluate_heldout`` reports, per routed layer, the executed fraction (eval mode: hard
decisions) and the router margin, mean ``|sigmoid(w.x) - threshold|``: how far decisions are
from flipping (zero-initialised routers start at margin 0). Under ``accelerate launch`` each
process scores its share of the sequences and the sums are reduced over processes.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F

from rt_lib.tuning.data import IGNORE_INDEX, collate


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: logits (B, T, V) predict labels (B, T) shifted by one."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def heldout_lm_loss(module, examples: list[dict], *, pad_id: int, batch_size: int = 8, device=None,
                    autocast=None, accelerator=None) -> float:
    """Mean next-token cross-entropy over the label tokens of ``examples`` (sharded over
    processes when ``accelerator`` is given)."""
    device = device or next(module.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = examples[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, tokens)
    for i in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in collate(mine[i:i + batch_size], pad_id).items()}
        with autocast or contextlib.nullcontext():
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total[0] += lm_loss_sum(logits, batch["labels"]).double()
        total[1] += (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp_min(1))


@dataclass
class HeldoutEval:
    """What ``evaluate_heldout`` measured; per-layer values are ``None`` for a layer no
    sequence reached."""

    lm_loss: float
    capacity: dict[int, float | None]  # executed fraction per routed layer
    margin: dict[int, float | None]  # mean |sigmoid(w.x) - threshold| per routed layer


class RouterMargins:
    """Forward hooks on the routers that sum ``|sigmoid(w.x) - threshold|`` and the number of
    scores per layer while the ``with`` block runs."""

    def __init__(self, ms):
        self.ms = ms
        self.sums = {i: [0.0, 0.0] for i in ms.routed_layers}  # layer -> [margin sum, scores]
        self._handles = []

    def _record(self, layer: int, module, args, out: torch.Tensor) -> None:
        self.sums[layer][0] += float((torch.sigmoid(out.float()) - self.ms.config.threshold).abs().sum())
        self.sums[layer][1] += out.numel()

    def __enter__(self) -> Self:
        for i, router in self.ms.routers().items():
            self._handles.append(router.register_forward_hook(functools.partial(self._record, i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def evaluate_heldout(ms, module, examples: list[dict], *, dense: bool, pad_id: int, batch_size: int,
                     device, autocast=None, accelerator=None) -> HeldoutEval:
    """LM loss on ``examples`` with the routers forced to keep everything (``dense``) or
    deciding, and the routers' executed fraction and margin per routed layer."""
    module.eval()
    ms.force(True if dense else None)
    ms.reset_stats()
    with RouterMargins(ms) as margins:
        loss = heldout_lm_loss(module, examples, pad_id=pad_id, batch_size=batch_size, device=device,
                               autocast=autocast, accelerator=accelerator)
    # executed and margin counts of every process: (layers, 4) = n_exec, n_total, margin sum, n
    gates = ms.gates
    counts = torch.tensor([[gates[i].n_exec, gates[i].n_total, *margins.sums[i]] for i in ms.routed_layers],
                          dtype=torch.float64, device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, "sum")
    capacity = {i: float(c[0] / c[1]) if c[1] else None for i, c in zip(ms.routed_layers, counts)}
    margin = {i: float(c[2] / c[3]) if c[3] else None for i, c in zip(ms.routed_layers, counts)}
    ms.force(None)
    return HeldoutEval(lm_loss=loss, capacity=capacity, margin=margin)

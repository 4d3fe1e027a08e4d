"""Sparse mixture-of-experts (MoE) blocks under MindSkip: which modules are MoE blocks, their
expert routers, a trace of what reaches each expert, and the load-balancing loss over it.

An MoE decoder layer of transformers 5 (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) holds its sparse
block where a dense layer holds its MLP (``layer.mlp``). The block's expert router
(``block.gate``, with ``num_experts`` and ``top_k``) returns, for the token rows it is given,
``(logits, top-k weights, top-k expert indices)``; the experts (``block.experts``) run each row
through its ``top_k`` experts. Qwen2-MoE adds a shared expert (``block.shared_expert``, scaled
by ``sigmoid(block.shared_expert_gate(x))``) that every row of the block runs. None of these
families has an expert capacity (no token is ever dropped by the block itself), and the block is
position-wise, so running it on a subset of the tokens gives those tokens exactly what the full
run gives them: what the ``moe`` granularity relies on to skip work for real.

The model's own router-logit output (``output_router_logits=True``) is recorded by transformers
with hooks on the expert routers, one entry per router call; under MindSkip a router is called
on the tokens that reached the block only, so the entries of routed layers have fewer rows
than the batch has tokens. ``load_balancing_loss`` is the models' auxiliary loss computed over
exactly the rows that reached each block (``rt_lib.mindskip.model`` uses it in place of
transformers' own, whose attention mask assumes every layer saw every token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


def is_moe_block(module: nn.Module) -> bool:
    """True for a sparse MoE block: an expert router ``gate`` (with ``num_experts`` and
    ``top_k``) and ``experts`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE in transformers 5)."""
    router = getattr(module, "gate", None)
    return (isinstance(router, nn.Module) and isinstance(getattr(router, "num_experts", None), int)
            and isinstance(getattr(router, "top_k", None), int)
            and isinstance(getattr(module, "experts", None), nn.Module))


def expert_router(block: nn.Module) -> nn.Module:
    """The expert router of a sparse MoE block (``block.gate``)."""
    if not is_moe_block(block):
        raise ValueError(f"{type(block).__name__} is not a sparse MoE block (an expert router `gate` with num_experts "
                         "and top_k, and `experts`)")
    return block.gate


def unwrapped(module: nn.Module) -> nn.Module:
    """The module itself, or the module a MindSkip gate (or a removed-sublayer stand-in) wraps."""
    inner = getattr(module, "_modules", {}).get("base_layer")
    if inner is not None:
        return inner
    return getattr(module, "_original", module)


def moe_layers(layers: nn.ModuleList) -> list[int]:
    """Indices of the decoder layers whose MLP slot (``layer.mlp``) holds a sparse MoE block."""
    return [i for i, layer in enumerate(layers)
            if is_moe_block(unwrapped(getattr(unwrapped(layer), "mlp", nn.Identity())))]


def block_of(layers: nn.ModuleList, i: int) -> nn.Module:
    """The sparse MoE block of layer ``i``, through any MindSkip gate around it or its layer."""
    return unwrapped(getattr(unwrapped(layers[i]), "mlp"))


@dataclass
class ExpertCall:
    """One call of a layer's expert router: the rows it was given and what it chose for them."""

    layer: int
    logits: torch.Tensor  # (N, num_experts), as the router returned them
    experts: torch.Tensor  # (N, top_k) expert indices
    tokens: torch.Tensor  # (B, T) bool: the token positions of the N rows, in row-major order
    real: torch.Tensor  # (N,) bool: rows that are real tokens (padding rows reach the block too)


class ExpertTrace:
    """Forward hooks on the expert router of every MoE layer; each call of a router, while some
    sink is open, is appended as an ``ExpertCall`` to every open sink.

    ``tokens_of(layer)`` gives the (B, T) mask of the token positions that layer's block was
    given in the current forward pass (None: every position); ``real_of()`` the (B, T) mask of
    real (non-padding) tokens of the current input.
    """

    def __init__(self, layers: nn.ModuleList, tokens_of: Callable[[int], torch.Tensor | None],
                 real_of: Callable[[], torch.Tensor | None]):
        self.layers = moe_layers(layers)
        self.sinks: list[list[ExpertCall]] = []
        self._tokens_of, self._real_of = tokens_of, real_of
        self._handles = [expert_router(block_of(layers, i)).register_forward_hook(self._hook(i))
                         for i in self.layers]

    def _hook(self, layer: int):
        def record(module, args, output):
            if not self.sinks:
                return
            logits, experts = output[0].detach(), output[2].detach()
            real = self._real_of()
            sent = self._tokens_of(layer)
            if sent is None and real is not None:
                sent = torch.ones_like(real)
            if sent is None or int(sent.sum()) != logits.shape[0]:
                raise RuntimeError(
                    f"expert trace of layer {layer}: the router was given {logits.shape[0]} rows but the block "
                    f"{'no known tokens' if sent is None else f'{int(sent.sum())} tokens'}; call the model with "
                    "input_ids or inputs_embeds of shape (batch, tokens)")
            call = ExpertCall(layer, logits, experts, sent, real[sent])
            for sink in self.sinks:
                sink.append(call)
        return record

    def open(self) -> list[ExpertCall]:
        """A new sink: the list the following router calls are appended to, until ``close``."""
        sink: list[ExpertCall] = []
        self.sinks.append(sink)
        return sink

    def close(self, sink: list[ExpertCall]) -> None:
        self.sinks = [s for s in self.sinks if s is not sink]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.sinks = []


def load_balancing_loss(calls: Sequence[ExpertCall], num_experts: int, top_k: int) -> torch.Tensor:
    """The auxiliary load-balancing loss of Mixtral-style MoE models (Switch Transformer eq. 4-6)
    over the real token rows that reached the expert routers.

    ``num_experts * sum_e f_e * P_e``: ``f_e`` the fraction of (row, top-k slot) assignments
    that go to expert e and ``P_e`` the mean router probability of e, both over the real rows of
    all calls pooled. Equal to transformers' ``load_balancing_loss_func`` when every layer saw
    every token (with or without an attention mask); under MindSkip a routed layer's rows are
    the tokens that reached its block, so skipped tokens count nowhere.
    """
    if not calls:
        return torch.zeros(())
    device = calls[0].logits.device
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sum = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for c in calls:
        w = c.real.to(device=device, dtype=torch.float32)
        probs = torch.softmax(c.logits.to(device).float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        tokens_per_expert = tokens_per_expert.scatter_add(0, chosen.reshape(-1), w.repeat_interleave(top_k))
        prob_sum = prob_sum + (probs * w.unsqueeze(-1)).sum(0)
        rows = rows + w.sum()
    rows = rows.clamp_min(1.0)
    return num_experts * torch.sum((tokens_per_expert / rows) * (prob_sum / rows))


def moe_parameters(model: nn.Module, layers: nn.ModuleList) -> dict | None:
    """Parameter counts of an MoE model (None for a model without sparse MoE blocks); works on
    the meta device.

    ``active_parameters`` is what one token runs through: every parameter of the model
    (embeddings and output head included) less, in each sparse block, the experts it does not
    pick, ``expert parameters x (1 - top_k / num_experts)`` (the experts of a block have equal
    sizes); the expert router and any shared expert run for every token. ``active_mlp_width``
    is the width of a SwiGLU MLP with as many parameters as one token's share of a block
    (``top_k`` experts and the shared expert), the MLP width of the memory and cost estimates.
    """
    idx = moe_layers(layers)
    if not idx:
        return None
    total = sum(p.numel() for p in model.parameters())
    experts = routers = shared = 0
    inactive = 0.0
    width = 0.0
    hidden = None
    for i in idx:
        block = block_of(layers, i)
        router = expert_router(block)
        n_exp = sum(p.numel() for p in block.experts.parameters())
        n_router = sum(p.numel() for p in router.parameters())
        n_shared = sum(p.numel() for p in block.parameters()) - n_exp - n_router
        experts, routers, shared = experts + n_exp, routers + n_router, shared + n_shared
        inactive += n_exp * (1.0 - router.top_k / router.num_experts)
        hidden = router.weight.shape[-1]
        width += (n_exp * router.top_k / router.num_experts + n_shared) / (3 * hidden)
    router = expert_router(block_of(layers, idx[-1]))
    return {"moe_layers": len(idx), "experts": router.num_experts, "top_k": router.top_k,
            "expert_parameters": experts, "expert_router_parameters": routers, "shared_expert_parameters": shared,
            "active_parameters": int(round(total - inactive)), "active_mlp_width": int(round(width / len(idx)))}

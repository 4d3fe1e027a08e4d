"""MindSkip: routers that gate the sublayers of a Hugging Face decoder and really skip them.

A router is `Linear(hidden_size, 1, bias=False)`, zero-initialised, reading the normalised
input of the gated sublayer; score `r = sigmoid(w . x)`, keep when `r >= threshold`
(docs/method.md; API in docs/core_api.md). The wrapper replaces a module of each routed decoder
layer in place (PEFT style, the original kept as `base_layer`):

    granularity  wrapped module         router input                    skipped output
    attn         layer.self_attn        input_layernorm(h) (its input)  zeros  (h unchanged)
    mlp          layer.mlp (dense)      the MLP's own normalised input  zeros  (h unchanged)
    moe          layer.mlp (sparse MoE) the block's normalised input    zeros  (h unchanged)
    block        the decoder layer      layer.input_layernorm(h)        h

`moe` is `mlp` on the layers of a mixture-of-experts model whose MLP slot holds a sparse MoE
block (expert router, experts, any shared expert; `rt_lib.mindskip.moe`): a skipped row or
token is never given to the block, so its expert router does not see it and no expert runs for
it. Router logits and the auxiliary loss of such a model cover the tokens that reached each
block (`_before_model`); `trace_experts` records what reached each expert.

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
Modules: `architecture` (layers, routable layers, windows), `gates` (the sequence and token
gates), `removal` (physically removed sublayers), `checkpoint` (the router checkpoint's files,
metadata and digests); this module holds the model handle, which saves and loads routers.
Training (`ms.train()`): hard decisions in the forward pass, full compute, straight-through
gradient `m = hard + r - r.detach()` to the router score; capacities are differentiable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import weakref
from pathlib import Path

import torch
from torch import nn

from rt_lib.mindskip.architecture import check_architecture, find_decoder, get_slot, routed_layers_for, set_slot
from rt_lib.mindskip.config import MindSkipConfig
from rt_lib.mindskip.gates import MindSkipGate, RoutingContext, make_gate
from rt_lib.mindskip.moe import ExpertCall, ExpertTrace, block_of, expert_router, load_balancing_loss, moe_layers
from rt_lib.mindskip.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, check_digests,
                                        config_digest, read_checkpoint_metadata, read_router_weights)
from rt_lib.files import file_sha256, readable_by_all

logger = logging.getLogger(__name__)


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
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self._head_hook = head.register_forward_pre_hook(_foldable_input) if isinstance(head, nn.Linear) else None
        self._layers = layers
        self._gates: dict[int, MindSkipGate] = {}
        for i in self.routed_layers:
            gate = make_gate(get_slot(layers, i, config.granularity), layers[i], i, config, model.config, self._ctx)
            set_slot(layers, i, config.granularity, gate)
            self._gates[i] = gate
        # MoE models: a trace of what reaches each expert router (`moe`), and the model's own
        # router-logit output and auxiliary loss over it (`_before_model`, `_after_model`)
        self._trace = ExpertTrace(layers, self._sent_tokens, lambda: self._ctx.real) if (
            config.granularity == "moe") else None
        self._aux_sink: list[ExpertCall] | None = None
        self._model_hooks = []
        if moe_layers(layers) and config.granularity in ("moe", "block") and hasattr(model, "router_aux_loss_coef"):
            self._model_hooks = [model.register_forward_pre_hook(self._before_model, with_kwargs=True),
                                 model.register_forward_hook(self._after_model, with_kwargs=True)]
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

    def _sent_tokens(self, layer: int) -> torch.Tensor | None:
        """The (B, T) token positions the MoE block of `layer` was given in the current forward
        pass: what its gate sent it, or None (every position) where no gate is in place."""
        g = self._gates.get(layer)
        return g.last_sent if g is not None and get_slot(self._layers, layer, "moe") is g else None

    def _before_model(self, module, args, kwargs):
        """Forward pre-hook of an MoE causal LM: when router logits are asked for while the gates
        really skip (eval, `skip` execution), take them and the auxiliary loss over from
        transformers, whose loss weighs every layer's router rows with the one attention mask of
        the batch: a routed layer's router saw only the tokens that reached its block."""
        if self._aux_sink is not None:  # a previous call stopped before its end
            self._trace.close(self._aux_sink)
            self._aux_sink = None
        want = kwargs.get("output_router_logits")
        if want is None:
            want = getattr(module.config, "output_router_logits", False)
        if not want or module.training or all(g.execution == "mask" for g in self._gates.values()):
            return None  # every token reaches every block: transformers' own output is right
        if self._trace is None:
            raise ValueError(
                "router logits of an MoE model routed at 'block' granularity are not available while the gates skip "
                "(a skipped layer's expert router runs on part of the batch, with filler tokens under token "
                "routing): route the MoE blocks with granularity 'moe', call set_execution('mask'), or leave "
                "output_router_logits off")
        if kwargs.get("return_dict") is False:
            raise ValueError("router logits under MindSkip come back in the model's output object: leave return_dict "
                             "at its default (True) when passing output_router_logits=True")
        self._aux_sink = self._trace.open()
        return args, {**kwargs, "output_router_logits": False}

    def _after_model(self, module, args, kwargs, output):
        """Forward hook of an MoE causal LM: the router logits recorded by the trace (one entry
        per router call, the rows of the tokens that reached the block) and the auxiliary loss
        over them (`rt_lib.mindskip.moe.load_balancing_loss`), added to the loss as the model
        would (`router_aux_loss_coef`) when it computed one."""
        sink, self._aux_sink = self._aux_sink, None
        if sink is None:
            return None
        self._trace.close(sink)
        router = expert_router(block_of(self._layers, self._trace.layers[0]))
        aux = load_balancing_loss(sink, router.num_experts, router.top_k)
        output["router_logits"] = tuple(c.logits for c in sink)
        output["aux_loss"] = aux
        if output.get("loss") is not None:
            output["loss"] = output["loss"] + module.router_aux_loss_coef * aux.to(output["loss"].device)
        return output

    @contextlib.contextmanager
    def trace_experts(self):
        """Within the block, every call of an MoE layer's expert router is appended to the
        yielded list as an `ExpertCall` (layer, router logits, chosen experts, the token
        positions of its rows, which rows are real tokens): what reached each layer's experts.
        Needs an MoE model routed at `moe` granularity."""
        if self._trace is None:
            raise ValueError(f"expert traces need an MoE model routed at granularity 'moe' (this one: "
                             f"{self.config.granularity!r}{'' if moe_layers(self._layers) else ', no MoE layers'})")
        sink = self._trace.open()
        try:
            yield sink
        finally:
            self._trace.close(sink)

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
        return [p for g in self._gates.values() for p in g.router.parameters()]

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

    @contextlib.contextmanager
    def forced(self, decisions=None):
        """``force(decisions)`` within the block; every gate's previous forcing comes back on exit,
        also when the block raises."""
        saved = {i: g.forced for i, g in self._gates.items()}
        self.force(decisions)
        try:
            yield self
        finally:
            self.force(saved)

    def set_execution(self, mode: str) -> None:
        if mode not in ("skip", "mask"):
            raise ValueError(f"execution mode must be 'skip' or 'mask', got {mode!r}")
        for g in self._gates.values():
            g.execution = mode

    # -- statistics and the regulariser -------------------------------------------------------
    def batch_capacities(self) -> dict[int, torch.Tensor]:
        """Capacity of each routed layer in the last forward pass only (differentiable in
        training, the regulariser's input; in eval computed from the last decisions)."""
        out = {}
        for i, g in self._gates.items():
            if g.capacity is not None:
                out[i] = g.capacity
            elif g.last_keep is not None:
                out[i] = g.last_keep.float().mean()
        return out

    def regularizer(self) -> torch.Tensor:
        caps = list(self.batch_capacities().values())
        if not caps:
            return torch.zeros((), device=self.device)
        s, lam = self.config.capacity_target, self.config.reg_lambda
        if self.config.reg_form == "global":  # one budget over all routed layers
            return lam * len(caps) * torch.relu(torch.stack(caps).mean() - s)
        return lam * sum(torch.relu(c - s) for c in caps)

    def reset_stats(self) -> None:
        for g in self._gates.values():
            g.reset_stats()

    def capacities(self) -> dict[int, float]:
        """Capacity (executed fraction) of each routed layer since the last reset, over the
        sequences or real tokens that ran (NaN if nothing ran); `batch_capacities` is the
        differentiable value of the last forward pass that the regulariser reads."""
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
            set_slot(self._layers, i, self.config.granularity, g.base_layer)
        self._hook.remove()
        if self._head_hook is not None:
            self._head_hook.remove()
        for h in self._model_hooks:
            h.remove()
        self._model_hooks = []
        if self._trace is not None:
            self._trace.remove()
            self._trace = None
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        self._gates = {}
        return self.model

    def decode_state(self) -> dict:
        """What the gates keep for the caches they prefilled (sequence routing: the decision
        and kept rows per cache; token routing: the key history), to put back with
        `restore_decode_state` after another prefill replaced it. The profiler uses this to
        decode several variants from their own prefilled caches in turn."""
        return {i: (getattr(g, "_seq_state", None), getattr(g, "_tok_state", None)) for i, g in self._gates.items()}

    def bind_decisions(self, cache, keep: torch.Tensor) -> None:
        """Continue decoding from `cache` with the per-row sequence decisions `keep` (rows x
        routed layers, in `routed_layers` order): a cache built by the caller, holding at each
        routed attention/block layer only the rows that keep it, in batch order."""
        if self.config.route_level != "seq":
            raise ValueError("bind_decisions applies to sequence routing")
        for j, layer in enumerate(self.routed_layers):
            hard = keep[:, j].to(device=self.device, dtype=torch.bool)
            self._gates[layer]._seq_state = (weakref.ref(cache), hard, hard.nonzero().squeeze(-1))

    def restore_decode_state(self, state: dict) -> None:
        for i, (seq, tok) in state.items():
            g = self._gates[i]
            if hasattr(g, "_seq_state"):
                g._seq_state = seq
            if hasattr(g, "_tok_state"):
                g._tok_state = tok

    @contextlib.contextmanager
    def detached(self):
        """Within the block `ms.model` is the plain base model (same weights, gates taken out);
        the gates return on exit. For timing the dense model on exactly the same tensors."""
        for i, g in self._gates.items():
            set_slot(self._layers, i, self.config.granularity, g.base_layer)
        try:
            yield self.model
        finally:
            for i, g in self._gates.items():
                set_slot(self._layers, i, self.config.granularity, g)

    # -- save / load ---------------------------------------------------------------------------
    def router_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"layers.{i}.router.{name}": p.detach().cpu().contiguous()
                for i, g in self._gates.items() for name, p in g.router.named_parameters()}

    def checkpoint_metadata(self) -> dict:
        import transformers

        from rt_lib import __version__

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
        readable_by_all(path / WEIGHTS_NAME)  # save_file writes 0600
        meta = self.checkpoint_metadata()
        meta["weights_sha256"] = file_sha256(path / WEIGHTS_NAME)
        meta["config_sha256"] = config_digest(meta)
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
        try:
            MindSkipConfig.from_dict(meta["config"])  # types and ranges of what the file records
        except (TypeError, ValueError) as e:
            raise ValueError(f"{Path(path) / CONFIG_NAME}: invalid router config: {e}") from None
        check_digests(Path(path), meta)  # ... and that it is what was saved
        cfg = MindSkipConfig.from_dict({**meta["config"], **overrides})
        weights = read_router_weights(Path(path))
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
                for name, p in g.router.named_parameters():
                    p.copy_(weights[f"layers.{i}.router.{name}"].to(p.dtype))
        return ms


def _short(name: str) -> str:
    return str(name).rstrip("/").split("/")[-1].lower()


def _foldable_input(module, args):
    """Forward pre-hook of the output projection: its input in contiguous strides.

    A prefill that keeps only the last position's logits (``logits_to_keep=1``, as ``generate``
    and the profiler do) passes the projection a (B, 1, d) slice of the (B, T, d) hidden
    states. With frozen weights (``requires_grad=False``, which MindSkip sets) PyTorch's matmul
    cannot fold that slice into one matrix product without a copy, so it falls back to a batched
    product that copies the whole transposed (vocab x d) weight at every call: 100 ms of a 300 ms
    prefill of 128 tokens of the embedded model on one CPU thread. Copying the B x d slice
    instead costs nothing measurable."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() >= 3 and any(
            x.stride(i) != x.stride(i + 1) * x.shape[i + 1] for i in range(x.dim() - 2)):
        return (x.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def get_mindskip_model(model: nn.Module, config: MindSkipConfig | None = None) -> MindSkipModel:
    """Attach zero-initialised MindSkip routers to `model` (in place); the base is frozen."""
    return MindSkipModel(model, config or MindSkipConfig())

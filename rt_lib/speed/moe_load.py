"""Expert load under MindSkip: per MoE layer and expert, the tokens the model's own expert
router assigns with nothing skipped, and the tokens that reach the expert once MindSkip skips.

    from rt_lib.speed.moe_load import expert_load, write_expert_load
    rows = expert_load(ms, batches)              # ms: a MindSkipModel at granularity 'moe', eval mode
    write_expert_load(rows, "results/moe")       # expert_load.csv and expert_load.png
    record_step("results/runs/<id>", rows, {"text": "wikipedia-en", ...})  # <run>/moe/ + run.json

Three counts per (layer, expert), over the real (non-padding) tokens of the batches, a token
counting once for each of its top-k experts:

- ``assigned``: the dense pass (``ms.detached()``: the base model, nothing skipped);
- ``executed``: the MindSkip pass (the gates' current decisions and execution mode), the
  tokens that really reached the expert (``MindSkipModel.trace_experts``);
- ``routed_assigned``: the same MindSkip pass, the expert router applied to every token's
  input at that layer, skipped ones included: what it would assign if this layer's MindSkip
  router kept everything. A measurement beside the pass (the router's ``forward`` called on
  the whole input, outside the skip path), never part of it.

``executed <= routed_assigned`` for every expert: both come from the same hidden states. The
dense ``assigned`` bounds ``executed`` per expert only where nothing was skipped before the
layer (the first routed layer, or every layer when one is routed): a skip upstream changes the
hidden states and with them the experts a token picks, so a deeper expert may execute more
tokens than the dense pass gives it, while its layer's total still falls (each token that
reaches the block takes exactly top-k experts).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from rt_lib.files import write_csv
from rt_lib.mindskip.moe import expert_router

COLUMNS = ("layer", "expert", "routed", "assigned", "routed_assigned", "executed")


def _unpack(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch, torch.ones_like(batch)
    if isinstance(batch, dict) and "input_ids" in batch:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        return ids, (torch.ones_like(ids) if mask is None else mask)
    raise ValueError("a batch is a (B, T) tensor of token ids or a dict with input_ids (and attention_mask); got "
                     f"{type(batch).__name__}")


def _count(counts: dict[int, torch.Tensor], layer: int, experts: torch.Tensor, real: torch.Tensor,
           num_experts: int) -> None:
    """Add the top-k choices of the real rows to ``counts[layer]`` (one count per expert)."""
    chosen = experts[real.to(experts.device)].reshape(-1).cpu()
    if layer not in counts:
        counts[layer] = torch.zeros(num_experts, dtype=torch.long)
    counts[layer] += torch.bincount(chosen, minlength=num_experts)


def expert_load(ms, batches: Iterable, device: str | torch.device | None = None) -> list[dict]:
    """Per MoE layer and expert: ``assigned``, ``routed_assigned`` and ``executed`` token counts
    over ``batches`` (see the module docstring); one row per (layer, expert), ``routed`` telling
    whether a MindSkip router gates the layer.

    ``ms`` is a ``MindSkipModel`` on an MoE model at granularity ``moe``, in eval mode; a batch
    is a (B, T) tensor of token ids or a dict with ``input_ids`` and ``attention_mask``.
    """
    if ms.config.granularity != "moe":
        raise ValueError(f"expert load needs routers at granularity 'moe', got {ms.config.granularity!r}")
    if ms.model.training:
        raise ValueError("expert load measures inference: call ms.eval() first (in training every token reaches "
                         "every block)")
    device = torch.device(device) if device is not None else ms.device
    gates = ms.gates
    counts: dict[str, dict[int, torch.Tensor]] = {k: {} for k in ("assigned", "routed_assigned", "executed")}
    whole: list[tuple[int, torch.Tensor]] = []  # (layer, experts of every token) at the routed layers

    def assign_all(layer: int):
        def pre(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            with torch.no_grad():  # forward, not __call__: the trace's hook does not record this measurement
                whole.append((layer, expert_router(module.base_layer).forward(x.reshape(-1, x.shape[-1]))[2]))
        return pre

    handles = [g.register_forward_pre_hook(assign_all(i), with_kwargs=True) for i, g in gates.items()]
    try:
        for batch in batches:
            ids, mask = (t.to(device) for t in _unpack(batch))
            whole.clear()
            with torch.no_grad():
                with ms.detached() as base, ms.trace_experts() as dense:
                    base(input_ids=ids, attention_mask=mask)
                with ms.trace_experts() as routed:
                    ms(input_ids=ids, attention_mask=mask)
            for key, calls in (("assigned", dense), ("executed", routed),
                               ("routed_assigned", [c for c in routed if c.layer not in gates])):
                for c in calls:
                    _count(counts[key], c.layer, c.experts, c.real, c.logits.shape[-1])
            real = mask.bool().reshape(-1)
            for layer, experts in whole:
                _count(counts["routed_assigned"], layer, experts, real, counts["assigned"][layer].numel())
    finally:
        for h in handles:
            h.remove()
    layers = sorted(counts["assigned"])
    return [{"layer": i, "expert": e, "routed": i in gates,
             **{k: int(counts[k][i][e]) if i in counts[k] else 0 for k in ("assigned", "routed_assigned", "executed")}}
            for i in layers for e in range(counts["assigned"][i].numel())]


def summarise(rows: list[dict]) -> list[dict]:
    """Per layer: the three totals and the executed fraction of the dense assignment."""
    out: dict[int, dict] = {}
    for r in rows:
        s = out.setdefault(r["layer"], {"layer": r["layer"], "routed": r["routed"], "assigned": 0,
                                        "routed_assigned": 0, "executed": 0})
        for k in ("assigned", "routed_assigned", "executed"):
            s[k] += r[k]
    for s in out.values():
        s["executed_fraction"] = s["executed"] / s["assigned"] if s["assigned"] else float("nan")
    return [out[i] for i in sorted(out)]


def write_expert_load(rows: list[dict], out_dir: str | os.PathLike, title: str | None = None) -> dict[str, Path]:
    """``expert_load.csv`` (the rows of ``expert_load``) and ``expert_load.png`` (assigned vs
    executed per expert, summed over the routed layers; ``rt_lib.plots.plot_expert_load``)."""
    from rt_lib import plots

    out = Path(out_dir)
    csv_path = write_csv(out / "expert_load.csv", rows, COLUMNS)
    fig = plots.plot_expert_load(rows, title=title)
    png = plots.save_figure(fig, out / "expert_load")[0]
    return {"csv": csv_path, "figure": png}


def record_step(run_dir: str | os.PathLike, rows: list[dict], parameters: dict, title: str | None = None) -> Path:
    """The expert-load step of a run folder: ``<run_dir>/moe/`` (``write_expert_load``) and
    run.json ``steps.moe`` (its files and the per-layer totals of ``summarise``) with
    ``parameters`` (the held-out text and batches it was measured on) as ``parameters.moe``.
    The run folder must exist (run.json: ``rt_lib.runs.record.new_run``). Returns the folder."""
    from rt_lib.runs.record import update_run

    out = Path(run_dir) / "moe"
    write_expert_load(rows, out, title=title)
    update_run(run_dir, "moe", {"files": ["moe/expert_load.csv", "moe/expert_load.png"], "layers": summarise(rows)},
               parameters=parameters)
    return out

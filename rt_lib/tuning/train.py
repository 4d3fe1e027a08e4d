"""Router-Tuning: train MindSkip routers on a frozen model (the method, one plain loop).

    python -m rt_lib train --recipe cpu --out results/runs/<id>
    accelerate launch --num_processes 2 -m rt_lib train --recipe paper --model meta-llama/Meta-Llama-3-8B ...

    from rt_lib.tuning.train import train_routers
    result = train_routers("cpu", out="results/runs/my-run", reg_lambda=0.05)
    result.ms            # the MindSkip model with tuned routers
    result.summary       # what train/summary.json holds

Method (paper section 3.2 + the later regulariser): only the routers are trainable; the model
is in train mode, where MindSkip takes hard keep/skip decisions in the forward pass and passes
the gradient straight through to the router score; loss = LM loss on label tokens +
``lambda * sum_l ReLU(capacity_l - s)``; AdamW, cosine schedule with linear warm-up,
gradient accumulation to a global batch, gradient clipping, bf16 autocast on GPUs that
support it. ``trainable="full"`` (routers + backbone) and ``trainable="lora"`` (routers + LoRA
adapters, peft) are the baselines of rt_lib.tuning.baselines, run by the same loop.

Data order is a pure function of (seed, epoch), so a checkpoint's step number is its data
position; resuming restores trainable weights, optimiser, scheduler and RNG states and gives
the same final routers as an uninterrupted run. Under ``accelerate launch`` each process takes
its share of every global batch; the LM loss is normalised by the label tokens of the whole
global batch, so N processes give the routers of one process with the same global batch.
Files are written by the main process only (layout: docs/results_format.md, ``train/``).

Where things are: ``rt_lib.tuning.config`` (options and recipes), ``rt_lib.tuning.tuner`` (setup /
step / finish), ``rt_lib.tuning.heldout`` (held-out loss and router statistics); this module holds
the entry points (``run``, ``train_routers``) and ``sweep_table``; the command line is
``rt_lib.cli.train``.

Scale-out. The entry point is the same for one or many processes:
- GPUs, DDP: ``accelerate launch --multi_gpu --num_processes 8 -m rt_lib train --recipe paper``.
  Every GPU holds a full bf16 copy of the frozen model (16 GB for 8B); gradients and AdamW
  state exist for the routers only (16 x 4096 numbers), so DDP is enough for 7-8B models.
- CPU, DDP over gloo: ``accelerate launch --multi_gpu --num_processes 2 -m rt_lib train ...``
  (or ``torchrun --nproc_per_node 2 -m rt_lib train ...``) on a machine without CUDA. With
  accelerate 1.15, ``accelerate launch --cpu --num_processes 2`` starts a single process
  (its multi-CPU mode goes through mpirun with a host file).
- Models that do not fit one device (or ``trainable="full"`` at 7B+): FSDP or DeepSpeed
  ZeRO-3 through an accelerate config file (``accelerate launch --config_file fsdp.yaml``).
  FSDP must keep the original parameters (``fsdp_use_orig_params: true``) because frozen and
  trainable (router) parameters share wrapped units; wrap at the decoder-layer class
  (``fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer``). Under DeepSpeed set bf16 in its
  config and ``--precision fp32`` here (DeepSpeed casts the model itself). Neither is tested
  on GPUs by the kit's test suite (no multi-GPU machine); DDP is.
- CPU, FSDP over gloo: ``accelerate launch --use_fsdp --num_processes 2 -m rt_lib train ...``.
  accelerate 1.15 applies FSDP to GPU processes only (without one it cannot build its FSDP
  plugin), so for CPU processes the tuner shards the frozen backbone itself with FSDP2
  (every decoder layer and the root; the routers stay whole on every process and their
  gradients are averaged as DDP averages them). Router-only training; the held-out sequences
  must split evenly over the processes. tests/test_fsdp.py checks that two such processes give
  the routers of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rt_lib.tuning.tuner import RouterTuner, TrainResult
from rt_lib.tuning.config import DEFAULT_RECIPE, TrainConfig, make_config


# =============================================================================== entry points
def train_routers(recipe: str | None = DEFAULT_RECIPE, *, model: Any = None, tokenizer: Any = None, data: Any = None,
                  heldout_data: Any = None, **options) -> TrainResult:
    """Run Router-Tuning with the options of the CLI (``TrainConfig`` fields).

    ``model`` may be a name (like ``--model``) or a loaded ``PreTrainedModel`` (then pass
    ``tokenizer``); ``data``/``heldout_data`` a name or path, or in-memory examples
    (a list of dicts or a ``datasets.Dataset``).
    """
    objects = {}
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with a model object")
        objects["model"], objects["tokenizer"] = model, tokenizer
        options["model"] = getattr(model.config, "rt_kit_name", None) or getattr(model.config, "_name_or_path", "") or "<in-memory model>"
    elif model is not None:
        options["model"] = os.fspath(model)
    for key, value in (("data", data), ("heldout_data", heldout_data)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            objects[key] = value
            options[key] = f"<in-memory {type(value).__name__}>"
        elif value is not None:
            options[key] = os.fspath(value)
    cfg = make_config(recipe, **options)
    return run(cfg, **objects)


def run(cfg: TrainConfig, *, model=None, tokenizer=None, data=None, heldout_data=None) -> TrainResult:
    """Setup, train, save, evaluate: ``RouterTuner`` driven step by step under a progress
    bar. All input checks happen in setup, before the first step."""
    from tqdm.auto import tqdm

    tuner = RouterTuner(cfg)
    tuner.setup(model=model, tokenizer=tokenizer, data=data, heldout_data=heldout_data)
    bar = tqdm(total=tuner.total_steps, initial=tuner.start_step, disable=not (cfg.progress and tuner.main),
               desc="router-tuning")
    for step in tuner.steps():
        row = tuner.step(step)
        tuner.record(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", cap=f"{row['mean_capacity']:.3f}")
    bar.close()
    return tuner.finish()


# =============================================================================== settings sweeps
def sweep_table(run_dirs, out_csv=None) -> list[dict]:
    """One row per finished tuning run (its train/summary.json and log.csv): the settings that
    differ in a sweep and what they reached. Written as CSV to ``out_csv`` if given."""
    rows = []
    for d in run_dirs:
        d = Path(d)
        summary_path = d / "train" / "summary.json"
        if not summary_path.is_file():
            continue
        s = json.loads(summary_path.read_text())
        c = s["train_config"]
        log = json.loads((d / "train" / "log.json").read_text())
        caps = [v for v in s["final_capacity"].values() if v is not None]
        margins = [v for v in (s.get("heldout_router_margin") or {}).values() if v is not None]
        dense, tuned = s["heldout_lm_loss"]["dense"], s["heldout_lm_loss"]["tuned"]
        rows.append({
            "run": d.name, "lr": c["lr"], "reg_lambda": c["reg_lambda"], "capacity_target": c["capacity_target"],
            "steps": s["steps"], "batch_size": c["batch_size"], "max_length": c["max_length"],
            "train_capacity_min": min(r["mean_capacity"] for r in log),
            "train_capacity_last": log[-1]["mean_capacity"],
            "heldout_capacity": sum(caps) / len(caps) if caps else None,
            "layers_always_skipped": sum(v == 0.0 for v in caps),
            "layers_always_kept": sum(v == 1.0 for v in caps),
            "heldout_loss_dense": dense, "heldout_loss_tuned": tuned,
            "heldout_loss_increase": tuned - dense if tuned is not None else None,
            "router_margin": sum(margins) / len(margins) if margins else None,
            "router_weight_norm": sum(s["router_weight_norm"].values()) / len(s["router_weight_norm"]),
            "wall_time_s": s["wall_time_s"],
        })
    if out_csv is not None:
        from rt_lib.files import write_csv

        write_csv(out_csv, rows)
    return rows

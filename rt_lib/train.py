"""Router-Tuning: train MindSkip routers on a frozen model (the recipe, one plain loop).

    python -m rt_lib.train --preset cpu --out results/runs/<id>
    accelerate launch --num_processes 2 -m rt_lib.train --preset paper --model meta-llama/Meta-Llama-3-8B ...

    from rt_lib.train import train_routers
    result = train_routers("cpu", out="results/runs/my-run", reg_lambda=0.05)
    result.ms            # the MindSkip model with tuned routers
    result.summary       # what train/summary.json holds

Recipe (paper section 3.2 + the later regulariser): only the routers are trainable; the model
is in train mode, where MindSkip takes hard keep/skip decisions in the forward pass and passes
the gradient straight through to the router score; loss = LM loss on label tokens +
``lambda * sum_l ReLU(capacity_l - s)``; AdamW, cosine schedule with linear warm-up,
gradient accumulation to a global batch, gradient clipping, bf16 autocast on GPUs that
support it. ``trainable="full"`` (routers + backbone) and ``trainable="lora"`` (routers + LoRA
adapters, peft) are the baselines of rt_lib.baselines, run by the same loop.

Data order is a pure function of (seed, epoch), so a checkpoint's step number is its data
position; resuming restores trainable weights, optimiser, scheduler and RNG states and gives
the same final routers as an uninterrupted run. Under ``accelerate launch`` each process takes
its share of every global batch; the LM loss is normalised by the label tokens of the whole
global batch, so N processes give the routers of one process with the same global batch.
Files are written by the main process only (layout: docs/results_format.md, ``train/``).

Scale-out. The entry point is the same for one or many processes:
- GPUs, DDP: ``accelerate launch --multi_gpu --num_processes 8 -m rt_lib.train --preset paper``.
  Every GPU holds a full bf16 copy of the frozen model (16 GB for 8B); gradients and AdamW
  state exist for the routers only (16 x 4096 numbers), so DDP is enough for 7-8B models.
- CPU, DDP over gloo: ``accelerate launch --multi_gpu --num_processes 2 -m rt_lib.train ...``
  (or ``torchrun --nproc_per_node 2 -m rt_lib.train ...``) on a machine without CUDA. With
  accelerate 1.15, ``accelerate launch --cpu --num_processes 2`` starts a single process
  (its multi-CPU mode goes through mpirun with a host file).
- Models that do not fit one device (or ``trainable="full"`` at 7B+): FSDP or DeepSpeed
  ZeRO-3 through an accelerate config file (``accelerate launch --config_file fsdp.yaml``).
  FSDP must keep the original parameters (``fsdp_use_orig_params: true``) because frozen and
  trainable (router) parameters share wrapped units; wrap at the decoder-layer class
  (``fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer``). Under DeepSpeed set bf16 in its
  config and ``--precision fp32`` here (DeepSpeed casts the model itself). Neither is tested
  by the kit's test suite (no multi-GPU machine); DDP is.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rt_lib.data import DataStats, build_dataset, collate, pad_token_id

logger = logging.getLogger(__name__)

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PRESETS = ("smoke", "cpu", "paper")
TRAINABLE = ("routers", "full", "lora")
STATE_NAME = "trainer_state.pt"


# =============================================================================== config
@dataclass
class TrainConfig:
    """Every option of a tuning run; presets (rt_lib/presets/<name>.json) fill it in."""

    preset: str | None = field(default=None, metadata={"help": "Preset the values came from (smoke, cpu, paper)."})
    # -- model and data
    model: str = field(default="smollm2-135m-instruct",
                       metadata={"help": "Embedded kit model, local folder or Hugging Face id (rt_lib.assets.load_model)."})
    model_dtype: str = field(default="float32",
                             metadata={"help": "dtype the backbone is loaded in (float32, bfloat16); routers stay float32."})
    data: str = field(default="wikipedia-en",
                      metadata={"help": "Tuning data: embedded name, .json/.jsonl file or Hugging Face dataset name."})
    data_split: str | None = field(default="train", metadata={"help": "Split of the tuning data."})
    data_format: str = field(default="auto", metadata={"help": "auto, instruction or text (rt_lib.data)."})
    template: str = field(default="paper",
                          metadata={"help": "Instruction template: paper (<|system|>/<|user|>/<|assistant|> + EOS) or chat (the tokenizer's)."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message added to instruction examples without one."})
    num_samples: int | None = field(default=1000,
                                    metadata={"help": "Examples drawn with the seed (packed sequences when packing); None = all."})
    max_length: int = field(default=2048, metadata={"help": "Truncate (or pack) to this many tokens."})
    packing: bool = field(default=False, metadata={"help": "Concatenate examples into max_length blocks."})
    heldout_data: str | None = field(default=None, metadata={"help": "Held-out data for dense-vs-tuned LM loss; None = the tuning data."})
    heldout_split: str | None = field(default=None,
                                      metadata={"help": "Split of the held-out data; None = examples of the tuning split not used for tuning."})
    heldout_samples: int = field(default=64, metadata={"help": "Held-out sequences (0 = no held-out evaluation)."})
    # -- MindSkip (rt_lib.config.MindSkipConfig)
    num_routed_layers: int = field(default=16, metadata={"help": "Route the n deepest layers except the last."})
    routed_layers: list[int] | None = field(default=None, metadata={"help": "Explicit routed layer indices (override n)."})
    granularity: str = field(default="attn", metadata={"help": "attn, mlp or block."})
    route_level: str = field(default="seq", metadata={"help": "seq or token."})
    threshold: float = field(default=0.5, metadata={"help": "Keep a sublayer when sigmoid(w.x) >= threshold."})
    capacity_target: float = field(default=0.5, metadata={"help": "Target capacity s of ReLU(capacity_l - s)."})
    reg_lambda: float = field(default=0.01, metadata={"help": "Weight lambda of the capacity regulariser."})
    # -- what is trained
    trainable: str = field(default="routers",
                           metadata={"help": "routers (Router-Tuning), full (routers + backbone) or lora (routers + LoRA)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (trainable=lora)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (trainable=lora)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (trainable=lora)."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           metadata={"help": "Module names that get LoRA adapters."})
    # -- optimisation
    lr: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Linear warm-up over this fraction of the steps, then cosine to 0."})
    epochs: int = field(default=1, metadata={"help": "Passes over the tuning data (ignored when max_steps is set)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimiser steps; None = epochs x (samples // batch_size)."})
    batch_size: int = field(default=64, metadata={"help": "Global (effective) batch: micro_batch_size x accumulation x processes."})
    micro_batch_size: int = field(default=4, metadata={"help": "Sequences per forward pass and process."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Clip the global gradient norm (None = no clipping)."})
    precision: str = field(default="auto",
                           metadata={"help": "auto (bf16 autocast on CUDA with bf16, else fp32), fp32 or bf16 (autocast, also on CPU)."})
    seed: int = field(default=42, metadata={"help": "Seed for data selection, data order and torch."})
    # -- run
    out: str | None = field(default=None, metadata={"help": "Run folder results/runs/<id>; train/ is written inside. None = write nothing."})
    save_every: int | None = field(default=None, metadata={"help": "Checkpoint every K steps (train/checkpoints/step-K); the end is always saved."})
    resume_from: str | None = field(default=None, metadata={"help": "Checkpoint folder to resume from, or 'latest' (newest in train/checkpoints)."})
    stop_after: int | None = field(default=None,
                                   metadata={"help": "Stop (with a checkpoint) after this global step, keeping the schedule of the full run."})
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size of the held-out evaluation."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None = torch's default)."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar (loss, mean capacity)."})

    def mindskip_config(self):
        from rt_lib.config import MindSkipConfig

        return MindSkipConfig(num_routed_layers=self.num_routed_layers, routed_layers=self.routed_layers,
                              granularity=self.granularity, route_level=self.route_level,
                              threshold=self.threshold, capacity_target=self.capacity_target,
                              reg_lambda=self.reg_lambda)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


# Options that may differ between a run and its resumption (they do not change the numbers).
_RESUME_FREE = {"out", "save_every", "resume_from", "stop_after", "progress", "threads", "eval_batch_size"}


def load_preset(name: str) -> dict:
    """The ``train`` section of ``rt_lib/presets/<name>.json``."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
        raise ValueError(f"unknown preset {name!r}; presets: {known}")
    return json.loads(path.read_text())["train"]


def make_config(preset: str | None = "cpu", **overrides) -> TrainConfig:
    """Defaults < preset file < ``overrides`` (``None`` values in overrides are ignored)."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown training options {unknown}; see TrainConfig.help()")
    values = dict(load_preset(preset)) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["preset"] = preset
    cfg = TrainConfig(**values)
    _check_config(cfg)
    return cfg


def _check_config(cfg: TrainConfig) -> None:
    if cfg.trainable not in TRAINABLE:
        raise ValueError(f"trainable must be one of {TRAINABLE}, got {cfg.trainable!r}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    for name in ("batch_size", "micro_batch_size", "max_length", "epochs", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("max_steps", "save_every", "stop_after"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.lr <= 0:
        raise ValueError(f"lr must be positive, got {cfg.lr}")
    cfg.mindskip_config()  # raises for a config that routes no layer, bad granularity, ...


# =============================================================================== result
@dataclass
class TrainResult:
    ms: Any  # MindSkipModel with the tuned routers (in eval mode)
    model: Any  # the module that was trained: ms.model, or the peft model for trainable="lora"
    tokenizer: Any
    summary: dict
    log: list[dict]
    run_dir: Path | None


def train_routers(preset: str | None = "cpu", *, model: Any = None, tokenizer: Any = None, data: Any = None,
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
    cfg = make_config(preset, **options)
    return run(cfg, **objects)


# =============================================================================== setup helpers
def _check_out_dir(out: str | None) -> None:
    """Fail before any model loading if the run folder cannot be written."""
    if out is None:
        return
    train_dir = Path(out) / "train"
    try:
        train_dir.mkdir(parents=True, exist_ok=True)
        probe = train_dir / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"output folder {train_dir} is not writable ({e.strerror or e}); pass another --out") from e


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast context (or a null context) and the precision actually used."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext(), "fp32"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), "bf16"
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16), "bf16"
    return contextlib.nullcontext(), "fp32"


def _set_trainable(ms, module, cfg: TrainConfig):
    """Make exactly the parameters of ``cfg.trainable`` trainable; return the module to train
    and its trainable (name, parameter) pairs, after asserting nothing else is trainable."""
    router_ids = {id(p) for p in ms.router_parameters()}
    if cfg.trainable == "full":
        for p in module.parameters():
            p.requires_grad_(True)
    elif cfg.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM")
        module = get_peft_model(module, lcfg)  # freezes everything but the adapters ...
        for p in ms.router_parameters():  # ... so the routers are switched back on
            p.requires_grad_(True)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if cfg.trainable == "routers":
        assert {id(p) for _, p in named} == router_ids, "only router parameters may be trainable"
    elif cfg.trainable == "lora":
        others = [n for n, p in named if id(p) not in router_ids and "lora_" not in n]
        assert not others and router_ids <= {id(p) for _, p in named}, f"unexpected trainable parameters {others[:5]}"
    return module, named


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def _atomic_dir(final: Path):
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` in one rename
    (an existing ``final`` is moved aside first), so a reader never sees a half-written folder."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_trained(train_dir: Path, ms, module, cfg: TrainConfig) -> None:
    """What a run produces, each part written atomically: ``routers/`` always, plus ``lora/``
    (the peft adapter) or ``backbone.safetensors`` (full-parameter weights, routers excluded)."""
    train_dir = Path(train_dir)
    with _atomic_dir(train_dir / "routers") as tmp:
        ms.save_pretrained(tmp)
    if cfg.trainable == "lora":
        with _atomic_dir(train_dir / "lora") as tmp:
            module.save_pretrained(str(tmp))
    elif cfg.trainable == "full":
        from safetensors.torch import save_file

        state = {n: p.detach().cpu().clone().contiguous() for n, p in ms.model.state_dict().items()
                 if "mindskip_router" not in n}
        tmp = train_dir / f".backbone.safetensors.tmp-{os.getpid()}"
        save_file(state, str(tmp))
        os.replace(tmp, train_dir / "backbone.safetensors")


def _latest_checkpoint(out: str | None) -> Path:
    ckpts = sorted((Path(out) / "train" / "checkpoints").glob("step-*")) if out else []
    if not ckpts:
        raise FileNotFoundError(f"resume_from='latest' but no checkpoint in {out}/train/checkpoints")
    return ckpts[-1]


# =============================================================================== evaluation
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
        total[0] += _ce_sum(logits, batch["labels"]).double()
        total[1] += (batch["labels"][:, 1:] != -100).sum()
    if accelerator is not None and world > 1:
        total = accelerator.reduce(total, "sum")
    return float(total[0] / total[1].clamp_min(1))


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: logits (B, T, V) predict labels (B, T) shifted by one."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def _eval_pair(ms, module, examples, cfg, pad_id, device, autocast, accelerator, which):
    """LM loss on held-out examples with routers forced dense or deciding, the executed
    fraction per layer, and the router margin per layer: mean |sigmoid(w.x) - threshold|, how
    far decisions are from flipping (zero-initialised routers start at margin 0)."""
    module.eval()
    ms.force(True if which == "dense" else None)
    ms.reset_stats()
    margins: dict[int, list[float]] = {i: [0.0, 0.0] for i in ms.routed_layers}

    def hook(i):
        def record(mod, args, out):
            margins[i][0] += float((torch.sigmoid(out.float()) - ms.config.threshold).abs().sum())
            margins[i][1] += out.numel()
        return record

    handles = [r.register_forward_hook(hook(i)) for i, r in ms.routers().items()]
    try:
        loss = heldout_lm_loss(module, examples, pad_id=pad_id, batch_size=cfg.eval_batch_size, device=device,
                               autocast=autocast, accelerator=accelerator)
    finally:
        for h in handles:
            h.remove()
    # executed and margin counts of every process: (layers, 4) = n_exec, n_total, margin sum, n
    gates = ms.gates
    counts = torch.tensor([[gates[i].n_exec, gates[i].n_total, *margins[i]] for i in ms.routed_layers],
                          dtype=torch.float64, device=device)
    if accelerator is not None and accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, "sum")
    stats = {i: float(c[0] / c[1]) if c[1] else None for i, c in zip(ms.routed_layers, counts)}
    margin = {i: float(c[2] / c[3]) if c[3] else None for i, c in zip(ms.routed_layers, counts)}
    ms.force(None)
    return loss, stats, margin


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS (ru_maxrss)"


# =============================================================================== the recipe
def run(cfg: TrainConfig, *, model=None, tokenizer=None, data=None, heldout_data=None) -> TrainResult:
    """Setup, train, save, evaluate. All input checks happen before the first step."""
    from accelerate import Accelerator

    from rt_lib.mindskip import get_mindskip_model, routed_layers_for

    t_start = time.perf_counter()
    _check_config(cfg)
    # `accelerate launch --multi_gpu` / torchrun on a machine without CUDA: data-parallel CPU
    # processes over gloo (accelerate only picks MULTI_CPU when told the device is the CPU).
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=launched and not torch.cuda.is_available())
    main = accelerator.is_main_process
    device = accelerator.device
    world = accelerator.num_processes
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if main:
        _check_out_dir(cfg.out)
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise ValueError(f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size x processes "
                         f"= {cfg.micro_batch_size} x {world}")
    accum = cfg.batch_size // (cfg.micro_batch_size * world)
    mcfg = cfg.mindskip_config()

    # -- model and data (errors here come before any training)
    if model is None:
        from rt_lib.assets import load_model

        model, tokenizer = load_model(cfg.model, dtype=cfg.model_dtype)
    routed = routed_layers_for(model, mcfg)  # errors here, before the data is built
    pad_id = pad_token_id(tokenizer)
    data_opts = dict(format=cfg.data_format, template=cfg.template, max_length=cfg.max_length,
                     packing=cfg.packing, seed=cfg.seed, system_prompt=cfg.system_prompt)
    examples, dstats = build_dataset(tokenizer, data if data is not None else cfg.data, split=cfg.data_split,
                                     num_samples=cfg.num_samples, **data_opts)
    heldout, hstats = [], None
    if cfg.heldout_samples:
        h_src = heldout_data if heldout_data is not None else (cfg.heldout_data or (data if data is not None else cfg.data))
        same = heldout_data is None and cfg.heldout_data is None and cfg.heldout_split is None
        # same source and split: the next examples of the seeded permutation (disjoint from tuning)
        if same and not cfg.packing and dstats.selected >= dstats.available:
            raise ValueError(f"all {dstats.available} examples of the tuning data are used for tuning, none is left "
                             "for the held-out loss: lower num_samples, pass heldout_data/heldout_split, "
                             "or heldout_samples=0")
        heldout, hstats = build_dataset(tokenizer, h_src, split=cfg.heldout_split or cfg.data_split,
                                        num_samples=cfg.heldout_samples,
                                        skip=(dstats.sequences if cfg.packing else dstats.selected) if same else 0,
                                        **data_opts)
    steps_per_epoch = len(examples) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} usable examples are fewer than one global batch of {cfg.batch_size}")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    if cfg.stop_after is not None and cfg.out is None:
        raise ValueError("stop_after needs an output folder for the checkpoint to resume from")

    # -- routers, trainable parameters, optimiser, schedule
    _seed_everything(cfg.seed)
    model.to(device)
    ms = get_mindskip_model(model, mcfg)
    assert ms.routed_layers == routed
    module, named = _set_trainable(ms, ms.model, cfg)
    params = [p for _, p in named]
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    autocast, precision = _autocast(cfg, device)

    start_step, log_rows, elapsed0, dense = 0, [], 0.0, None
    resume = _latest_checkpoint(cfg.out) if cfg.resume_from == "latest" else cfg.resume_from
    if resume:
        state = torch.load(Path(resume) / STATE_NAME, map_location="cpu", weights_only=False)
        changed = {k: (state["config"].get(k), v) for k, v in cfg.to_dict().items()
                   if k not in _RESUME_FREE and state["config"].get(k) != v}
        if changed:
            raise ValueError(f"cannot resume from {resume}: options differ from the checkpoint's {changed}")
        with torch.no_grad():
            for n, p in named:
                p.copy_(state["trainable"][n].to(p.device, p.dtype))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, log_rows, elapsed0, dense = state["step"], state["log"], state["elapsed_s"], state["dense"]
        logger.info("resuming from %s at step %d", resume, start_step)

    run_dir = Path(cfg.out) if cfg.out else None
    if main and run_dir is not None:
        from rt_lib.runs import new_run

        new_run(root=run_dir.parent, run_id=run_dir.name, preset=cfg.preset,
                parameters={"train": _jsonable_config(cfg)})

    # Dense reference before any update (the base model; routers forced to keep everything).
    if heldout and dense is None:
        dense, _, _ = _eval_pair(ms, module, heldout, cfg, pad_id, device, autocast, accelerator, "dense")

    module, optimizer = accelerator.prepare(module, optimizer)
    if resume:
        _set_rng_state(state["rng"])  # after every setup step that may draw random numbers
        del state

    # -- the loop
    layers = ms.routed_layers
    n = len(examples)
    shard = cfg.batch_size // world
    end_step = min(total_steps, cfg.stop_after or total_steps)
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=not (cfg.progress and main), desc="router-tuning")
    t0 = time.perf_counter() - elapsed0
    for step in range(start_step, end_step):
        module.train()
        ms.train()
        epoch, k = divmod(step, steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        ids = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size].tolist()
        mine = ids[accelerator.process_index * shard:(accelerator.process_index + 1) * shard]
        micro = [collate([examples[i] for i in mine[j:j + cfg.micro_batch_size]], pad_id)
                 for j in range(0, shard, cfg.micro_batch_size)]
        # LM loss = sum over the global batch / label tokens of the global batch; DDP averages
        # gradients over processes, hence the factor `world` below.
        counts = torch.tensor([float(sum((b["labels"][:, 1:] != -100).sum() for b in micro)),
                               float(sum(b["attention_mask"].sum() for b in micro))], device=device)
        if world > 1:
            counts = accelerator.reduce(counts, "sum")
        label_tokens, tokens = counts.tolist()
        seen = (log_rows[-1]["tokens"] if log_rows else 0) + int(tokens)  # cumulative input tokens
        sums = torch.zeros(2 + len(layers), dtype=torch.float64, device=device)  # lm sum, reg, capacities
        for j, b in enumerate(micro):
            b = {key: v.to(device) for key, v in b.items()}
            sync = contextlib.nullcontext() if j == len(micro) - 1 else accelerator.no_sync(module)
            with sync:
                with autocast:
                    logits = module(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                ce = _ce_sum(logits, b["labels"])
                reg = ms.regularizer()
                loss = ce * world / label_tokens + reg / len(micro)
                accelerator.backward(loss)
            caps = ms.capacities()
            sums[0] += ce.detach().double()
            sums[1] += reg.detach().double() / len(micro)
            sums[2:] += torch.stack([caps[i].detach().double() for i in layers]) / len(micro)
        if cfg.max_grad_norm is not None:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if world > 1:
            sums = accelerator.reduce(sums, "sum")
            sums[1:] /= world
        lm = float(sums[0]) / label_tokens
        row = {"step": step + 1, "loss": lm + float(sums[1]), "lm_loss": lm, "reg_loss": float(sums[1]),
               "lr": lr, "mean_capacity": float(sums[2:].mean()),
               **{f"capacity_L{i}": float(c) for i, c in zip(layers, sums[2:])},
               "tokens": seen, "elapsed_s": round(time.perf_counter() - t0, 3)}
        log_rows.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", cap=f"{row['mean_capacity']:.3f}")
        done = step + 1 == end_step
        if main and run_dir is not None:
            _write_log(run_dir, log_rows)
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or (done and end_step < total_steps):
                _save_checkpoint(run_dir, step + 1, ms, accelerator.unwrap_model(module), cfg, named, optimizer,
                                 scheduler, log_rows, time.perf_counter() - t0, dense)
        accelerator.wait_for_everyone()
    bar.close()
    train_time = time.perf_counter() - t0
    module = accelerator.unwrap_model(module)
    ms.eval()
    module.eval()
    finished = end_step == total_steps

    # -- held-out evaluation, final save, summary
    tuned, caps, margin = None, {}, {}
    if heldout and finished:
        tuned, caps, margin = _eval_pair(ms, module, heldout, cfg, pad_id, device, autocast, accelerator, "tuned")
    mem, mem_kind = _peak_memory_mb(device)
    summary = {
        "preset": cfg.preset,
        "finished": finished,
        "steps": end_step,
        "total_steps": total_steps,
        "wall_time_s": round(train_time, 3),
        "total_time_s": round(time.perf_counter() - t_start, 3),
        "peak_memory_mb": round(mem, 1),
        "peak_memory_kind": mem_kind,
        "final_capacity": {str(i): caps.get(i) for i in layers},
        "final_capacity_source": "executed fraction per routed layer on the held-out sequences (eval mode)",
        "final_train_capacity": {str(i): log_rows[-1][f"capacity_L{i}"] for i in layers} if log_rows else {},
        "heldout_router_margin": {str(i): margin.get(i) for i in layers},
        "router_weight_norm": {str(i): float(r.weight.detach().float().norm()) for i, r in ms.routers().items()},
        "heldout_lm_loss": {"dense": dense, "tuned": tuned},
        "heldout_skip_ratio": (1.0 - sum(caps.values()) / len(caps)) if caps else None,  # mean over layers
        "config": {**ms.config.to_dict(), "routed_layers": layers},  # resolved layer list
        "routed_layers": layers,
        "trainable": cfg.trainable,
        "trainable_parameters": sum(p.numel() for p in params),
        "precision": precision,
        "processes": world,
        "gradient_accumulation": accum,
        "warmup_steps": warmup,
        "data": dstats.to_dict(),
        "heldout_data": hstats.to_dict() if hstats else None,
        "train_config": _jsonable_config(cfg),
    }
    if main and run_dir is not None:
        from rt_lib.runs import atomic_write_json, update_run

        if finished:
            save_trained(run_dir / "train", ms, module, cfg)
        atomic_write_json(run_dir / "train" / "summary.json", summary)
        update_run(run_dir, "train", {
            "file": "train/summary.json", "model": cfg.model, "data": cfg.data,
            **{k: summary[k] for k in ("trainable", "config", "finished", "steps", "wall_time_s", "peak_memory_mb",
                                       "heldout_lm_loss", "heldout_skip_ratio", "final_capacity")}})
    accelerator.wait_for_everyone()
    return TrainResult(ms=ms, model=module, tokenizer=tokenizer, summary=summary, log=log_rows, run_dir=run_dir)


def _jsonable_config(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def _write_log(run_dir: Path, rows: list[dict]) -> None:
    from rt_lib.runs import atomic_write_json, write_csv

    write_csv(run_dir / "train" / "log.csv", rows)
    atomic_write_json(run_dir / "train" / "log.json", rows)


def _save_checkpoint(run_dir, step, ms, module, cfg, named, optimizer, scheduler, log_rows, elapsed, dense):
    """``train/checkpoints/step-<N>/``: the loadable result (routers/, lora/ or backbone) and
    ``trainer_state.pt`` (trainable weights, optimiser, scheduler, RNG, log, data position)."""
    final = run_dir / "train" / "checkpoints" / f"step-{step:06d}"
    with _atomic_dir(final) as tmp:
        if cfg.trainable != "full":  # full-parameter weights are in trainer_state.pt already
            save_trained(tmp, ms, module, cfg)
        else:
            ms.save_pretrained(tmp / "routers")
        torch.save({"step": step, "config": _jsonable_config(cfg),
                    "trainable": {n: p.detach().cpu().clone() for n, p in named},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(), "log": log_rows, "elapsed_s": elapsed, "dense": dense},
                   tmp / STATE_NAME)


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
        from rt_lib.runs import write_csv

        write_csv(out_csv, rows)
    return rows


# =============================================================================== CLI
def _arg_type(hint):
    """(argparse kwargs) for a TrainConfig field type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list:
        return {"nargs": "+", "type": args[0]}
    return {"type": hint}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rt_lib.train",
                                description="Router-Tuning: train MindSkip routers on a frozen model.")
    p.add_argument("--preset", default="cpu", help=f"Preset file in rt_lib/presets ({', '.join(PRESETS)}).")
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                       help=f.metadata.get("help", ""), **_arg_type(hints[f.name]))
    return p


def main(argv: list[str] | None = None) -> TrainResult:
    args = vars(build_parser().parse_args(argv))
    preset = args.pop("preset")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = make_config(preset, **args)
    result = run(cfg)
    s = result.summary
    print(json.dumps({k: s[k] for k in ("steps", "wall_time_s", "peak_memory_mb", "heldout_lm_loss",
                                        "heldout_skip_ratio", "final_capacity")}, indent=1))
    return result


if __name__ == "__main__":
    main()

"""One Router-Tuning run in three phases: ``setup``, ``step`` (one optimiser step), ``finish``.

    tuner = RouterTuner(cfg)
    tuner.setup()                        # model, data, routers, optimiser, schedule, resume state
    for k in tuner.steps():
        row = tuner.step(k)              # one optimiser step -> its row of train/log.csv
        tuner.record(row)                # log files, checkpoint when due
    result = tuner.finish()              # routers saved, held-out evaluation, summary

``rt_lib.tuning.train.run`` is this driver with a progress bar; ``rt_lib.tuning.train`` describes the method
itself (loss, schedule, data order, resumption, processes). Every input check happens in
``setup``, before the first step. The training loop is written out by hand rather than run by
``transformers.Trainer``: the LM loss is normalised by the label tokens of the whole global
batch, the regulariser and the per-layer executed fractions are logged per step, and a resumed
run must give the routers of an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rt_lib.tuning.data import IGNORE_INDEX, build_dataset, collate, pad_token_id
from rt_lib.tuning.heldout import evaluate_heldout, lm_loss_sum
from rt_lib.files import atomic_dir
from rt_lib.tuning.config import RESUME_FREE, TrainConfig, check_config, jsonable_config, upgrade_config
from rt_lib.tuning.trainer_state import TENSORS_NAME, read_state, write_state

logger = logging.getLogger(__name__)

STATE_NAME = TENSORS_NAME  # with trainer_state.json beside it (rt_lib.tuning.trainer_state)


@dataclass
class TrainResult:
    ms: Any  # MindSkipModel with the tuned routers (in eval mode)
    model: Any  # the module that was trained: ms.model, or the peft model for trainable="lora"
    tokenizer: Any
    summary: dict
    log: list[dict]
    run_dir: Path | None


class RouterTuner:
    """One tuning run of ``cfg``; see the module docstring for the order of the calls."""

    def __init__(self, cfg: TrainConfig):
        self.t_start = time.perf_counter()
        check_config(cfg)
        self.cfg = cfg
        self.mcfg = cfg.mindskip_config()
        self.run_dir = Path(cfg.out) if cfg.out else None
        self.log: list[dict] = []  # rows of train/log.csv, restored on resumption
        self.start_step = 0
        self.elapsed0 = 0.0  # training seconds before a resumption
        self.dense_loss: float | None = None  # held-out LM loss of the base model (routers forced dense)

    # ------------------------------------------------------------------------- setup
    def setup(self, *, model=None, tokenizer=None, data=None, heldout_data=None) -> None:
        """Everything before the first step; raises for any bad input before training starts.

        ``model``/``tokenizer`` and ``data``/``heldout_data`` replace ``cfg.model`` and
        ``cfg.data``/``cfg.heldout_data`` with objects already in memory.
        """
        self._setup_processes()
        model = self._setup_model(model, tokenizer)
        self._setup_data(data, heldout_data)
        self._setup_training(model)
        state = self._restore()
        if self.main and self.run_dir is not None:
            from rt_lib.runs.record import new_run

            new_run(root=self.run_dir.parent, run_id=self.run_dir.name,
                    parameters={"train": jsonable_config(self.cfg)})
        # Dense reference before any update (the base model; routers forced to keep everything).
        if self.heldout and self.dense_loss is None:
            self.dense_loss = self._evaluate(dense=True).lm_loss
        if self.shard_backbone:  # sharded already; the routers are plain replicated tensors
            self.optimizer = self.accelerator.prepare(self.optimizer)
        else:
            self.module, self.optimizer = self.accelerator.prepare(self.module, self.optimizer)
        if state is not None:
            _set_rng_state(state["rng"])  # after every setup step that may draw random numbers
        self.end_step = min(self.total_steps, self.cfg.stop_after or self.total_steps)
        self.t0 = time.perf_counter() - self.elapsed0

    def _setup_processes(self) -> None:
        """Accelerator, device and the checks that need the number of processes."""
        from accelerate import Accelerator

        cfg = self.cfg
        # `accelerate launch --multi_gpu` / torchrun on a machine without CUDA: data-parallel CPU
        # processes over gloo (accelerate only picks MULTI_CPU when told the device is the CPU).
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        # `accelerate launch --use_fsdp` on CPU processes: accelerate 1.15 applies FSDP to GPU
        # processes only and cannot even build its FSDP plugin without one, so the tuner shards
        # the frozen backbone itself (_shard_backbone) and accelerate runs plain CPU processes
        self.shard_backbone = (launched and not torch.cuda.is_available()
                               and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")
        with _env_without("ACCELERATE_USE_FSDP") if self.shard_backbone else contextlib.nullcontext():
            self.accelerator = Accelerator(cpu=launched and not torch.cuda.is_available())
        self.main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.world = self.accelerator.num_processes
        if self.shard_backbone and cfg.trainable != "routers":
            raise ValueError("FSDP on CPU processes shards the frozen backbone: it needs trainable='routers'")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.main:
            _check_out_dir(cfg.out)
        if self.main and cfg.out:
            from rt_lib.runs.steps import prepare_training

            prepare_training(cfg.out, replace=cfg.replace, resuming=cfg.resume_from is not None)
        if cfg.batch_size % (cfg.micro_batch_size * self.world):
            raise ValueError(f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size x processes "
                             f"= {cfg.micro_batch_size} x {self.world}")
        if cfg.stop_after is not None and cfg.out is None:
            raise ValueError("stop_after needs an output folder for the checkpoint to resume from")
        self.accum = cfg.batch_size // (cfg.micro_batch_size * self.world)

    def _setup_model(self, model, tokenizer):
        """Load the backbone (unless given) and check the routed layers fit it."""
        from rt_lib.mindskip.architecture import routed_layers_for

        if model is None:
            from rt_lib.assets.loading import load_model

            model, tokenizer = load_model(self.cfg.model, dtype=self.cfg.model_dtype)
        self.routed = routed_layers_for(model, self.mcfg)  # errors here, before the data is built
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        return model

    def _setup_data(self, data, heldout_data) -> None:
        """Tuning and held-out sequences, and the number of steps they make."""
        cfg = self.cfg
        data_opts = dict(format=cfg.data_format, template=cfg.template, max_length=cfg.max_length,
                         packing=cfg.packing, seed=cfg.seed, system_prompt=cfg.system_prompt)
        source = data if data is not None else cfg.data
        self.examples, self.dstats = build_dataset(self.tokenizer, source, split=cfg.data_split,
                                                   num_samples=cfg.num_samples, **data_opts)
        self.heldout, self.hstats = [], None
        if cfg.heldout_samples:
            h_src = heldout_data if heldout_data is not None else (cfg.heldout_data or source)
            same = heldout_data is None and cfg.heldout_data is None and cfg.heldout_split is None
            dstats = self.dstats
            # same source and split: the next examples of the seeded permutation (disjoint from tuning)
            if same and not cfg.packing and dstats.selected >= dstats.available:
                raise ValueError(f"all {dstats.available} examples of the tuning data are used for tuning, none is "
                                 "left for the held-out loss: lower num_samples, pass heldout_data/heldout_split, "
                                 "or heldout_samples=0")
            self.heldout, self.hstats = build_dataset(
                self.tokenizer, h_src, split=cfg.heldout_split or cfg.data_split, num_samples=cfg.heldout_samples,
                skip=(dstats.sequences if cfg.packing else dstats.selected) if same else 0, **data_opts)
        if self.shard_backbone and len(self.heldout) % self.world:
            raise ValueError(f"under FSDP every process runs the same forward passes: heldout_samples "
                             f"({len(self.heldout)}) must be a multiple of the {self.world} processes")
        self.steps_per_epoch = len(self.examples) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.examples)} usable examples are fewer than one global batch of {cfg.batch_size}")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

    def _setup_training(self, model) -> None:
        """Seed, routers, trainable parameters, optimiser, schedule and precision."""
        from accelerate.utils import set_seed
        from transformers import get_cosine_schedule_with_warmup

        from rt_lib.mindskip.model import get_mindskip_model

        cfg = self.cfg
        set_seed(cfg.seed)  # python, numpy and torch (all devices)
        model.to(self.device)
        self.ms = get_mindskip_model(model, self.mcfg)
        assert self.ms.routed_layers == self.routed
        self.module, self.named = _set_trainable(self.ms, self.ms.model, cfg)
        if self.shard_backbone:
            _shard_backbone(self.ms, self.world)
        self.params = [p for _, p in self.named]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        self.warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, self.warmup, self.total_steps)
        self.autocast, self.precision = _autocast(cfg, self.device)

    def _restore(self) -> dict | None:
        """Load ``cfg.resume_from`` into the trainable weights, optimiser, schedule and log;
        return the checkpoint (its RNG state is restored last, by ``setup``) or ``None``."""
        cfg = self.cfg
        resume = _latest_checkpoint(cfg.out) if cfg.resume_from == "latest" else cfg.resume_from
        if not resume:
            return None
        state = read_state(resume)  # safetensors + JSON, layout checked; never unpickled
        saved_config = upgrade_config(state["config"])  # a checkpoint of an older run: options renamed since
        # an option the checkpoint does not record was added later: that run had its default behaviour
        defaults = TrainConfig().to_dict()
        changed = {k: (saved_config.get(k, defaults.get(k)), v) for k, v in cfg.to_dict().items()
                   if k not in RESUME_FREE and saved_config.get(k, defaults.get(k)) != v}
        if changed:
            raise ValueError(f"cannot resume from {resume}: options differ from the checkpoint's {changed}")
        names = {n: tuple(p.shape) for n, p in self.named}
        saved = {n: tuple(t.shape) for n, t in state["trainable"].items()}
        if saved != names:
            raise ValueError(f"cannot resume from {resume}: its trainable weights {sorted(saved)} do not match "
                             f"this run's {sorted(names)} (names and shapes)")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(state["trainable"][n].to(p.device, p.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start_step, self.log, self.elapsed0 = state["step"], state["log"], state["elapsed_s"]
        self.dense_loss = state["dense"]
        logger.info("resuming from %s at step %d", resume, self.start_step)
        return state

    # ------------------------------------------------------------------------- steps
    def steps(self) -> range:
        """The 0-based steps this run still takes (up to ``stop_after`` or the end)."""
        return range(self.start_step, self.end_step)

    def capacity_target_at(self, step: int) -> float:
        """The regulariser's capacity target at optimiser step ``step`` (0-based): with
        ``target_anneal`` a > 0 it falls linearly from 1.0 to ``capacity_target`` over the first
        ``a`` share of the steps (reached at the last of them), then stays there."""
        s, a = self.cfg.capacity_target, self.cfg.target_anneal
        if a <= 0:
            return s
        span = max(1, round(a * self.total_steps))
        return 1.0 - (1.0 - s) * min(1.0, (step + 1) / span)

    def step(self, step: int) -> dict:
        """Optimiser step ``step`` (0-based) over one global batch; returns its log row."""
        cfg, acc = self.cfg, self.accelerator
        self.module.train()
        self.ms.train()
        micro = self._micro_batches(step)
        # LM loss = sum over the global batch / label tokens of the global batch; DDP averages
        # gradients over processes, hence the factor `world` in _forward_backward.
        counts = torch.tensor([float(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in micro)),
                               float(sum(b["attention_mask"].sum() for b in micro))], device=self.device)
        if self.world > 1:
            counts = acc.reduce(counts, "sum")
        label_tokens, tokens = counts.tolist()
        target, final = self.capacity_target_at(step), self.ms.config.capacity_target
        self.ms.config.capacity_target = target  # the regulariser reads it; the saved config keeps the final one
        try:
            sums = self._forward_backward(micro, label_tokens)
        finally:
            self.ms.config.capacity_target = final
        if self.shard_backbone:  # replicated routers: average their gradients as DDP does
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.world)
        if cfg.max_grad_norm is not None:
            acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.world > 1:
            sums = acc.reduce(sums, "sum")
            sums[1:] /= self.world
        lm = float(sums[0]) / label_tokens
        layers = self.ms.routed_layers
        return {"step": step + 1, "loss": lm + float(sums[1]), "lm_loss": lm, "reg_loss": float(sums[1]),
                "lr": lr, "capacity_target": target, "mean_capacity": float(sums[2:].mean()),
                **{f"capacity_L{i}": float(c) for i, c in zip(layers, sums[2:])},
                "tokens": (self.log[-1]["tokens"] if self.log else 0) + int(tokens),  # cumulative input tokens
                "elapsed_s": round(time.perf_counter() - self.t0, 3)}

    def _micro_batches(self, step: int) -> list[dict]:
        """This process's share of global batch ``step``, collated into micro batches. The data
        order is a pure function of (seed, epoch), so a step number is a data position."""
        cfg = self.cfg
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        ids = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size].tolist()
        shard = cfg.batch_size // self.world
        rank = self.accelerator.process_index
        mine = ids[rank * shard:(rank + 1) * shard]
        return [collate([self.examples[i] for i in mine[j:j + cfg.micro_batch_size]], self.pad_id)
                for j in range(0, shard, cfg.micro_batch_size)]

    def _forward_backward(self, micro: list[dict], label_tokens: float) -> torch.Tensor:
        """Accumulate the gradients of the micro batches (synchronised across processes on the
        last one); return this process's (LM loss sum, regulariser, capacity per layer)."""
        acc, ms, world = self.accelerator, self.ms, self.world
        layers = ms.routed_layers
        sums = torch.zeros(2 + len(layers), dtype=torch.float64, device=self.device)
        for j, b in enumerate(micro):
            b = {key: v.to(self.device) for key, v in b.items()}
            sync = contextlib.nullcontext() if j == len(micro) - 1 else acc.no_sync(self.module)
            with sync:
                with self.autocast:
                    logits = self.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                ce = lm_loss_sum(logits, b["labels"])
                reg = ms.regularizer()
                loss = ce * world / label_tokens + reg / len(micro)
                acc.backward(loss)
            caps = ms.batch_capacities()
            sums[0] += ce.detach().double()
            sums[1] += reg.detach().double() / len(micro)
            sums[2:] += torch.stack([caps[i].detach().double() for i in layers]) / len(micro)
        return sums

    def record(self, row: dict) -> None:
        """Append ``row`` to the log, write train/log.csv and a checkpoint when one is due."""
        cfg = self.cfg
        self.log.append(row)
        step = row["step"]
        if self.main and self.run_dir is not None:
            _write_log(self.run_dir, self.log)
            stopping_early = step == self.end_step and self.end_step < self.total_steps  # stop_after
            if (cfg.save_every and step % cfg.save_every == 0) or stopping_early:
                self._save_checkpoint(step)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, step: int) -> None:
        """``train/checkpoints/step-<N>/``: the loadable result (routers/, lora/ or backbone) and
        the trainer state (trainable weights, optimiser, scheduler, RNG, log, data position) as
        ``trainer_state.safetensors`` + ``trainer_state.json`` (``rt_lib.tuning.trainer_state``)."""
        cfg, ms = self.cfg, self.ms
        module = self.accelerator.unwrap_model(self.module)
        with atomic_dir(self.run_dir / "train" / "checkpoints" / f"step-{step:06d}") as tmp:
            if cfg.trainable != "full":  # full-parameter weights are in the trainer state already
                save_trained(tmp, ms, module, cfg)
            else:
                ms.save_pretrained(tmp / "routers")
            write_state(tmp, {"step": step, "config": jsonable_config(cfg),
                              "trainable": {n: p.detach().cpu().clone() for n, p in self.named},
                              "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                              "rng": _rng_state(), "log": self.log, "elapsed_s": time.perf_counter() - self.t0,
                              "dense": self.dense_loss})

    # ------------------------------------------------------------------------- finish
    def finish(self) -> TrainResult:
        """Save the routers (if the run reached its last step), evaluate on the held-out
        sequences, write train/summary.json and the ``train`` entry of run.json."""
        train_time = time.perf_counter() - self.t0
        self.module = self.accelerator.unwrap_model(self.module)
        self.ms.eval()
        self.module.eval()
        finished = self.end_step == self.total_steps
        tuned = self._evaluate(dense=False) if self.heldout and finished else None
        summary = self._summary(finished, train_time, tuned)
        if self.main and self.run_dir is not None:
            from rt_lib.files import atomic_write_json
            from rt_lib.runs.record import update_run

            if finished:
                save_trained(self.run_dir / "train", self.ms, self.module, self.cfg)
            atomic_write_json(self.run_dir / "train" / "summary.json", summary)
            update_run(self.run_dir, "train", {
                "file": "train/summary.json", **({"status": "completed"} if finished else {}),
                **{k: summary[k] for k in ("config", "finished", "steps", "wall_time_s", "peak_memory_mb",
                                           "heldout_lm_loss", "heldout_skip_ratio", "final_capacity")}},
                parameters=jsonable_config(self.cfg))
        self.accelerator.wait_for_everyone()
        return TrainResult(ms=self.ms, model=self.module, tokenizer=self.tokenizer, summary=summary, log=self.log,
                           run_dir=self.run_dir)

    def _evaluate(self, *, dense: bool):
        return evaluate_heldout(self.ms, self.module, self.heldout, dense=dense, pad_id=self.pad_id,
                                batch_size=self.cfg.eval_batch_size, device=self.device, autocast=self.autocast,
                                accelerator=self.accelerator)

    def _summary(self, finished: bool, train_time: float, tuned) -> dict:
        """What train/summary.json holds (layout: docs/results_format.md)."""
        cfg, ms, layers = self.cfg, self.ms, self.ms.routed_layers
        caps, margin = (tuned.capacity, tuned.margin) if tuned is not None else ({}, {})
        mem, mem_kind = _peak_memory_mb(self.device)
        return {
            "recipe": cfg.recipe,
            "finished": finished,
            "steps": self.end_step,
            "total_steps": self.total_steps,
            "wall_time_s": round(train_time, 3),
            "total_time_s": round(time.perf_counter() - self.t_start, 3),
            "peak_memory_mb": round(mem, 1),
            "peak_memory_kind": mem_kind,
            "final_capacity": {str(i): caps.get(i) for i in layers},
            "final_capacity_source": "executed fraction per routed layer on the held-out sequences (eval mode)",
            "final_train_capacity": {str(i): self.log[-1][f"capacity_L{i}"] for i in layers} if self.log else {},
            "heldout_router_margin": {str(i): margin.get(i) for i in layers},
            "router_weight_norm": {str(i): float(r.weight.detach().float().norm()) for i, r in ms.routers().items()},
            "heldout_lm_loss": {"dense": self.dense_loss, "tuned": tuned.lm_loss if tuned is not None else None},
            "heldout_skip_ratio": (1.0 - sum(caps.values()) / len(caps)) if caps else None,  # mean over layers
            "config": {**ms.config.to_dict(), "routed_layers": layers},  # resolved layer list
            "routed_layers": layers,
            "trainable": cfg.trainable,
            "trainable_parameters": sum(p.numel() for p in self.params),
            "precision": self.precision,
            "backbone_dtype": str(ms.model.get_input_embeddings().weight.dtype).removeprefix("torch."),
            "processes": self.world,
            "gradient_accumulation": self.accum,
            "warmup_steps": self.warmup,
            "data": self.dstats.to_dict(),
            "heldout_data": self.hstats.to_dict() if self.hstats else None,
            "train_config": jsonable_config(cfg),
        }


# =============================================================================== helpers
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


def _shard_backbone(ms, world: int) -> None:
    """FSDP2 over CPU processes: every decoder layer and the root sharded over the processes,
    the routers left out (``ignored_params``), so they stay whole on every process: checkpoints,
    statistics and the optimiser see plain tensors, and ``step`` averages their gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from rt_lib.mindskip.architecture import find_decoder

    mesh = init_device_mesh("cpu", (world,))
    routers = set(ms.router_parameters())
    _, layers = find_decoder(ms.model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params=routers)
    fully_shard(ms.model, mesh=mesh, ignored_params=routers)


@contextlib.contextmanager
def _env_without(name: str):
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


# Hand-written: accelerate saves RNG states only inside Accelerator.save_state's folder layout,
# and a checkpoint here keeps them in its trainer state next to the optimiser and the log.
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


def save_trained(train_dir: Path, ms, module, cfg: TrainConfig) -> None:
    """What a run produces, each part written atomically: ``routers/`` always, plus ``lora/``
    (the peft adapter) or ``backbone.safetensors`` (full-parameter weights, routers excluded)."""
    train_dir = Path(train_dir)
    with atomic_dir(train_dir / "routers") as tmp:
        ms.save_pretrained(tmp)
    if cfg.trainable == "lora":
        with atomic_dir(train_dir / "lora") as tmp:
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


def _write_log(run_dir: Path, rows: list[dict]) -> None:
    from rt_lib.files import atomic_write_json, write_csv

    # the newest row's columns in its order: a run resumed from a checkpoint written before a column
    # existed keeps the declared order, with empty cells in the older rows
    columns = dict.fromkeys([*(rows[-1] if rows else {}), *(k for r in rows for k in r)])
    write_csv(run_dir / "train" / "log.csv", rows, columns=columns)
    atomic_write_json(run_dir / "train" / "log.json", rows)


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS (ru_maxrss)"

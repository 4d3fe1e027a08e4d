"""Options of a Router-Tuning run (``TrainConfig``) and the training recipes that fill them in.

Values resolve in three layers: ``TrainConfig`` defaults < the ``train`` section of the recipe
``rt_lib/tuning/recipes/<name>.json`` < explicit overrides (CLI flags or ``train_routers`` keywords).
``make_config`` does the layering and checks every option before anything is loaded;
``notebook_config`` does the same for notebook 01's parameters (and the plan of a pipeline preset).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

# The training recipes: one JSON file each, rt_lib/tuning/recipes/<name>.json (the registry is the folder).
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
TRAIN_RECIPES = tuple(sorted(p.stem for p in RECIPES_DIR.glob("*.json")))
DEFAULT_RECIPE = "cpu"
TRAINABLE = ("routers", "full", "lora")

# Options that may differ between a run and its resumption (they do not change the numbers).
RESUME_FREE = frozenset({"out", "replace", "save_every", "resume_from", "stop_after", "progress", "threads", "eval_batch_size"})


@dataclass
class TrainConfig:
    """Every option of a tuning run; recipes (rt_lib/tuning/recipes/<name>.json) fill it in."""

    recipe: str | None = field(default=None, metadata={
        "help": f"Training recipe rt_lib/tuning/recipes/<name>.json the values come from ({', '.join(TRAIN_RECIPES)}; "
                f"the CLI's default: {DEFAULT_RECIPE})."})
    # -- model and data
    model: str = field(default="smollm2-135m-instruct",
                       metadata={"help": "Embedded kit model, local folder or Hugging Face id (rt_lib.assets.loading.load_model)."})
    model_dtype: str = field(default="float32",
                             metadata={"help": "dtype the backbone is loaded in: float32, bfloat16, or auto (bfloat16 on CUDA and on CPUs with native bf16 matrix products, else float32); routers stay float32."})
    data: str = field(default="wikipedia-en",
                      metadata={"help": "Tuning data: embedded name, .json/.jsonl file or Hugging Face dataset name."})
    data_split: str | None = field(default="train", metadata={"help": "Split of the tuning data."})
    data_format: str = field(default="auto", metadata={"help": "auto, instruction or text (rt_lib.tuning.data)."})
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
    # -- MindSkip (rt_lib.mindskip.config.MindSkipConfig)
    num_routed_layers: int = field(default=16, metadata={"help": "Route the n deepest layers except the last."})
    routed_layers: list[int] | None = field(default=None, metadata={"help": "Explicit routed layer indices (override n)."})
    granularity: str = field(default="attn", metadata={"help": "attn, mlp, block, or moe (the sparse MoE blocks of an MoE model)."})
    route_level: str = field(default="seq", metadata={"help": "seq or token."})
    threshold: float = field(default=0.5, metadata={"help": "Keep a sublayer when sigmoid(w.x) >= threshold."})
    capacity_target: float = field(default=0.5, metadata={"help": "Target capacity s of ReLU(capacity_l - s)."})
    target_anneal: float = field(default=0.0, metadata={
        "help": "Share of the steps over which the capacity target falls linearly from 1.0 to capacity_target (0 = the target from the first step)."})
    reg_lambda: float = field(default=0.01, metadata={"help": "Weight lambda of the capacity regulariser."})
    reg_form: str = field(default="layer", metadata={
        "help": "layer: lambda * sum_l ReLU(capacity_l - s); global: lambda * n * ReLU(mean_l capacity_l - s) (one budget)."})
    router_init: float = field(default=0.5, metadata={
        "help": "Router score before tuning: 0.5 = zero-initialised, no bias; e.g. 0.9 starts every router above the threshold (routers get a bias)."})
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
    replace: bool = field(default=False, metadata={"help": "Move a previous training in --out (and later steps made with "
                                                                "it) to <out>/replaced/ first; without it such a folder is refused."})
    stop_after: int | None = field(default=None,
                                   metadata={"help": "Stop (with a checkpoint) after this global step, keeping the schedule of the full run."})
    eval_batch_size: int = field(default=8, metadata={"help": "Batch size of the held-out evaluation."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None = torch's default)."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm progress bar (loss, mean capacity)."})

    def mindskip_config(self):
        from rt_lib.mindskip.config import MindSkipConfig

        return MindSkipConfig(num_routed_layers=self.num_routed_layers, routed_layers=self.routed_layers,
                              granularity=self.granularity, route_level=self.route_level,
                              threshold=self.threshold, capacity_target=self.capacity_target,
                              reg_lambda=self.reg_lambda, reg_form=self.reg_form, router_init=self.router_init)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def load_recipe(name: str) -> dict:
    """The ``train`` section of the recipe ``rt_lib/tuning/recipes/<name>.json``."""
    if name not in TRAIN_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {list(TRAIN_RECIPES)}")
    return json.loads((RECIPES_DIR / f"{name}.json").read_text())["train"]


def make_config(recipe: str | None = DEFAULT_RECIPE, **overrides) -> TrainConfig:
    """Defaults < recipe file < ``overrides`` (``None`` values in overrides are ignored)."""
    known = {f.name for f in fields(TrainConfig)} - {"recipe"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown training options {unknown}; see TrainConfig.help()")
    values = dict(load_recipe(recipe)) if recipe else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["recipe"] = recipe
    cfg = TrainConfig(**values)
    check_config(cfg)
    return cfg


# Notebook 01's parameters that are training options; any other option goes through its
# ``train_options`` dict (rt_lib.pipeline.plan reads the same parameters from a pipeline preset).
NOTEBOOK_OPTIONS = ("model", "data", "granularity", "route_level", "num_routed_layers", "capacity_target",
                    "reg_lambda", "lr", "max_steps", "progress")


def notebook_options(parameters: Mapping[str, Any]) -> dict:
    """The training options in notebook 01's ``parameters`` (a mapping; other names are ignored):
    its named options (``NOTEBOOK_OPTIONS``) that are not None, then every field of its
    ``train_options`` dict, which wins. Raises ``ValueError`` for a ``train_options`` field that
    ``TrainConfig`` does not have (the recipe is the notebook's ``recipe`` parameter)."""
    extra = parameters.get("train_options") or {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"train_options must be a dict of TrainConfig fields, got {extra!r}")
    valid = sorted(set(TrainConfig.help()) - {"recipe"})
    unknown = sorted(set(extra) - set(valid))
    if unknown:
        hint = " (the recipe is the notebook's recipe parameter)" if "recipe" in unknown else ""
        raise ValueError(f"train_options has unknown fields {unknown}{hint}; valid: {valid}")
    options = {k: parameters[k] for k in NOTEBOOK_OPTIONS if parameters.get(k) is not None}
    options.update(extra)
    return options


def notebook_config(parameters: Mapping[str, Any], **overrides) -> TrainConfig:
    """The checked ``TrainConfig`` of notebook 01's ``parameters``: the recipe named by its
    ``recipe`` parameter (default ``DEFAULT_RECIPE``) < its options (``notebook_options``) <
    ``overrides``. Raises ``ValueError``/``TypeError`` for any option no run could use, before
    anything is loaded or written."""
    options = {**notebook_options(parameters), **{k: v for k, v in overrides.items() if v is not None}}
    return make_config(parameters.get("recipe") or DEFAULT_RECIPE, **options)


def upgrade_config(values: Mapping[str, Any]) -> dict:
    """Recorded training options (``jsonable_config``: summary.json ``train_config``, a checkpoint's
    trainer_state.json ``config``) under today's names: older runs called the recipe ``preset``
    (``rt_lib.runs.schema.RENAMED_FIELDS``)."""
    from rt_lib.runs.schema import RENAMED_FIELDS

    out = dict(values)
    for old, new in RENAMED_FIELDS["train"].items():
        if old in out:
            value = out.pop(old)
            out.setdefault(new, value)
    return out


def check_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` for an option no run could use (the checks that need the model,
    the data or the number of processes come later, still before the first step)."""
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
    if not 0.0 <= cfg.target_anneal <= 1.0:
        raise ValueError(f"target_anneal must be in [0, 1], got {cfg.target_anneal}")
    cfg.mindskip_config()  # raises for a config that routes no layer, bad granularity, ...



def jsonable_config(cfg: TrainConfig) -> dict:
    """``cfg`` as plain JSON values (what run.json, summary.json and checkpoints record)."""
    return json.loads(json.dumps(cfg.to_dict(), default=str))

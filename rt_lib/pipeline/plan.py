"""What a pipeline preset will need, before any weights are loaded: assets, memory, KV cache, tokens.

    python -m rt_lib plan --preset paper [--model PATH_OR_ID] [--gpu-memory 80GiB] [--json plan.json]
    python -m rt_lib reproduce --preset paper --plan        # the same, with the pipeline's -p overrides
    python -m rt_lib train --recipe paper --plan            # the same, with the training flags

Every asset is resolved without downloading weights: the model's config and tokenizer (an
embedded kit model, a local folder, the Hugging Face cache, or the hub when it is reachable:
only ``config.json`` and the tokenizer files are fetched), the tuning data and the evaluation
tasks. The model is built on the meta device (no memory, no weights), which gives the exact
parameter count and the routed layers. Per step of the pipeline the plan prints:

- ``train`` (the training recipe the preset's notebook 01 tunes; ``train --recipe X --plan``
  plans the preset whose notebook 01 tunes X): parameters and weight memory in the recipe's
  dtype; the routers' parameters, their gradients and AdamW state; the activation memory of one
  micro batch (``activation_bytes_per_token``) and the logits (``micro_batch x max_length x vocab x 4``
  bytes, float32) with the loss working set around them; the total against the GPU memory;
- ``eval``: the task set, whether its data is here, and the evaluation tokens (counted with
  the harness's own request building on the meta model when the data is here and the task set
  is small, or with ``--eval-tokens yes``; otherwise "needs the task data" and the command);
- ``profile``: the KV-cache bytes of every point of the profiling grid the preset uses
  (``rt_lib.speed.roofline.estimate_kv_bytes``) and which points do not fit the GPU memory
  (the profiler's own rule: ``rt_lib.speed.roofline.estimate_point_bytes`` against
  ``memory_headroom``, 90%, of what the weights leave free).

A missing asset never stops the plan: it is listed with the command that fetches it, and the
numbers that need it are printed as unknown. The exit status is 0 whenever a plan was printed
and 2 for bad input (unknown preset, recipe, task set or grid, unparsable ``--gpu-memory``, a
local path that does not exist). ``--json FILE`` writes the same plan as JSON (``-`` prints it instead of the text).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rt_lib.pipeline.plan_assets import PlanInputError, first_line, quiet, resolve_data, resolve_model, resolve_tasks
from rt_lib.pipeline.plan_memory import (
    activation_bytes_per_token,
    dtype_bytes,
    loss_bytes_per_token,
    meta_model,
    model_shape,
    roofline_shape,
)
from rt_lib.pipeline.plan_report import format_plan

log = logging.getLogger(__name__)

DEFAULT_PRESET = "paper"




# ============================================================================ small helpers
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_memory(text: str | int | float) -> int:
    """Bytes from ``80GiB``, ``48GB``, ``24 GiB``, ``80G`` (= GiB) or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "b"
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m:
            raise PlanInputError(f"cannot read the memory size {text!r}: write e.g. 80GiB, 48GB or 24G")
        value, unit = float(m.group(1)), (m.group(2) or "b").lower()
        if unit not in _UNITS:
            raise PlanInputError(f"unknown unit {m.group(2)!r} in {text!r}: "
                                 "use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    if value <= 0:
        raise PlanInputError(f"memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def resolve_dtype_name(name: str | None, device: str) -> str:
    """A dtype name for ``device``: ``auto`` (or None) is bfloat16 on CUDA and on CPUs with native
    bf16 matrix products, float32 elsewhere (``rt_lib.assets.loading.resolve_dtype``)."""
    if name is None or str(name) == "auto":
        if device == "cuda":
            return "bfloat16"
        from rt_lib.assets.loading import native_bf16

        return "bfloat16" if native_bf16("cpu") else "float32"
    dtype_bytes(name)  # raises for an unknown name
    return str(name).removeprefix("torch.")


def count_eval_tokens(meta, tokenizer, task_set: str, tasks: list[str] | None, limit, batch_size: int) -> dict:
    """Documents, forward passes and input tokens of a task set, from the harness's own request
    building (same tasks, shots, sampler, truncation as ``rt_lib.evaluation.driver.evaluate``) over
    ``meta``, a model on the meta device: every request is recorded, none is scored."""
    from lm_eval import simple_evaluate

    from rt_lib.evaluation.driver import DEFAULT_SEEDS, check_request, harness_samples
    from rt_lib.evaluation.harness import MindSkipLM, load_task, task_manager

    class _Counter(MindSkipLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            for _, ctx, cont in requests:  # HFLM: one pass per distinct context + continuation[:-1]
                self.inputs.add(tuple((ctx + cont)[-(self.max_length + 1):][:-1]))
            self.n_requests += len(requests)
            return [(-1.0, False)] * len(requests)

    p, names = check_request(task_set, tasks, limit, batch_size)
    rows = []
    start = time.perf_counter()
    with quiet():
        tm = task_manager(p.offline)
        lm = _Counter(pretrained=meta, tokenizer=tokenizer, batch_size=batch_size)
        for task in names:
            _, obj = load_task(tm, p, task)
            lim = limit if limit is not None else p.limits.get(task)
            lm.inputs, lm.n_requests = set(), 0
            res = simple_evaluate(model=lm, tasks=[obj], num_fewshot=p.shots[task], limit=lim,
                                  samples=harness_samples(p, obj, lim), batch_size=batch_size, task_manager=tm,
                                  bootstrap_iters=0, **DEFAULT_SEEDS)
            lengths = sorted((len(x) for x in lm.inputs), reverse=True)
            padded = sum(lengths[i] * len(lengths[i:i + batch_size]) for i in range(0, len(lengths), batch_size))
            rows.append({"task": task, "shots": p.shots[task],
                         "docs": sum(s.get("effective", 0) for s in res.get("n-samples", {}).values()),
                         "requests": lm.n_requests, "forward_passes": len(lengths), "input_tokens": sum(lengths),
                         "padded_tokens": padded, "max_len": lengths[0] if lengths else 0})
    keys = ("docs", "requests", "forward_passes", "input_tokens", "padded_tokens")
    total = {k: sum(r[k] for r in rows) for k in keys}
    total["max_len"] = max((r["max_len"] for r in rows), default=0)
    return {"tasks": rows, "total": total, "max_length": lm.max_length,
            "seconds": round(time.perf_counter() - start, 1)}


# ============================================================================ the plan
def _gpu(gpu_memory: str | int | None) -> dict:
    if gpu_memory is not None:
        return {"bytes": parse_memory(gpu_memory), "source": f"--gpu-memory {gpu_memory}"}
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return {"bytes": int(props.total_memory), "source": f"cuda:0 {props.name}"}
    except Exception:  # a broken CUDA set-up: the plan goes on without the device
        pass
    return {"bytes": None, "source": "unknown (no CUDA device visible; pass --gpu-memory, e.g. 80GiB)"}


def pipeline_parameters(preset: str, notebook_overrides: dict | None = None) -> dict[str, dict]:
    """The notebook parameters of a pipeline preset with overrides, by notebook."""
    from rt_lib.pipeline import notebooks as pipeline

    base = pipeline.load_preset(preset)
    over = notebook_overrides or {}
    return {nb: {**base.get(nb, {}), **over.get(nb, {})} for nb in pipeline.NOTEBOOKS}


def preset_for_recipe(recipe: str) -> str:
    """The pipeline preset whose notebook 01 tunes the training recipe ``recipe`` (the preset of
    the same name first), else ``DEFAULT_PRESET``: what ``train --recipe X --plan`` plans the
    evaluation and profiling steps with."""
    from rt_lib.pipeline import notebooks as pipeline
    from rt_lib.tuning.config import DEFAULT_RECIPE

    for name in sorted(pipeline.available_presets(), key=lambda n: n != recipe):
        if (pipeline.load_preset(name).get("01_router_tuning") or {}).get("recipe", DEFAULT_RECIPE) == recipe:
            return name
    return DEFAULT_PRESET


def make_plan(preset: str = DEFAULT_PRESET, *, recipe: str | None = None, model: str | None = None,
              gpu_memory: str | int | None = None, train_overrides: dict | None = None,
              notebook_overrides: dict | None = None, eval_tokens: str = "auto", processes: int = 1,
              device: str | None = None) -> dict:
    """The plan as a JSON-able dict (``format_plan`` prints it). ``recipe`` replaces the training
    recipe notebook 01 of the preset names. Raises ``PlanInputError`` for input no plan can be
    made for; a missing asset is recorded in ``missing`` instead."""
    from rt_lib.pipeline import notebooks as pipeline
    from rt_lib.tuning.config import notebook_config

    try:
        nb = pipeline_parameters(preset, notebook_overrides)
    except pipeline.ParameterError as e:
        raise PlanInputError(str(e)) from e
    if eval_tokens not in ("auto", "yes", "no"):
        raise PlanInputError(f"eval_tokens must be auto, yes or no, got {eval_tokens!r}")
    if processes < 1:
        raise PlanInputError(f"processes must be positive, got {processes}")
    gpu = _gpu(gpu_memory)
    tuning = {**nb["01_router_tuning"], **({"recipe": recipe} if recipe else {})}
    overrides = {**(train_overrides or {}), **({"model": model} if model is not None else {})}
    try:  # the same options, checked the same way, as notebook 01 builds them
        cfg = notebook_config(tuning, **overrides)
    except (ValueError, TypeError) as e:
        raise PlanInputError(str(e)) from e
    if device is None:
        device = "cuda" if gpu["bytes"] is not None or cfg.model_dtype in ("bfloat16", "float16") else "cpu"
    if device not in ("cuda", "cpu"):
        raise PlanInputError(f"device must be cuda or cpu, got {device!r}")

    plan: dict[str, Any] = {"preset": preset, "recipe": cfg.recipe, "device": device, "gpu_memory": gpu, "missing": [],
                            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    rec, config, tok, missing = resolve_model(cfg.model)
    plan["missing"] += missing
    plan["model"] = rec
    meta = shape = None
    if config is not None:
        shape = model_shape(config)
        rec["shape"] = shape
        try:
            meta = meta_model(config, resolve_dtype_name(cfg.model_dtype, device))
            rec["parameters"] = sum(p.numel() for p in meta.parameters())
        except Exception as e:
            rec["notes"].append(f"meta-device model: {first_line(e)}")
    if meta is not None:
        from rt_lib.mindskip.architecture import find_decoder
        from rt_lib.mindskip.moe import moe_parameters

        moe = moe_parameters(meta, find_decoder(meta)[1])
        if moe is not None:
            rec["moe"] = moe
    if tok is not None:
        rec["tokenizer_tokens"] = len(tok)
        if shape is not None and len(tok) != shape["vocab"]:
            rec["notes"].append(
                f"the tokenizer has {len(tok):,} tokens and the model's vocabulary {shape['vocab']:,} rows: "
                + ("its ids fit the embedding, but it may not be this model's tokenizer"
                   if len(tok) < shape["vocab"] else "ids above the vocabulary would fail: not this model's tokenizer"))

    plan["train"] = _train_step(cfg, rec, meta, shape, gpu, processes, device, plan["missing"])
    plan["eval"] = _eval_step(nb["02_evaluation"], rec, meta, tok, shape, gpu, eval_tokens, preset, plan["missing"],
                              device)
    plan["profile"] = _profile_step(nb["03_speedup_profiling"], cfg, rec, shape, gpu, device)
    return plan


def _train_step(cfg, rec, meta, shape, gpu, processes, device, missing) -> dict:
    step: dict[str, Any] = {"recipe_file": f"rt_lib/tuning/recipes/{cfg.recipe}.json", "trainable": cfg.trainable,
                            "model_dtype": cfg.model_dtype, "precision": cfg.precision}
    for what, name, split in (("tuning data", cfg.data, cfg.data_split),
                              ("held-out data", cfg.heldout_data, cfg.heldout_split or cfg.data_split)):
        if name is None:
            continue
        r, m = resolve_data(name, split, what)
        step["data" if what == "tuning data" else "heldout_data"] = r
        missing += m
    micro = cfg.micro_batch_size
    per_step = micro * processes
    step["batches"] = {
        "num_samples": cfg.num_samples, "batch_size": cfg.batch_size, "micro_batch_size": micro,
        "max_length": cfg.max_length, "processes": processes, "packing": cfg.packing,
        "accumulation": cfg.batch_size // per_step if cfg.batch_size % per_step == 0 else None,
        "steps": cfg.max_steps or (cfg.epochs * (cfg.num_samples // cfg.batch_size) if cfg.num_samples else None),
        "max_tokens_per_step": cfg.batch_size * cfg.max_length,
    }
    if cfg.batch_size % per_step:
        step["batches"]["error"] = (f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size x processes = "
                                    f"{micro} x {processes}: the run would stop in setup")
    if meta is None or shape is None:
        step["status"] = "needs the model config"
        return step
    model_dtype = resolve_dtype_name(cfg.model_dtype, device)
    nbytes = dtype_bytes(model_dtype)
    autocast_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device == "cuda")
    act_b = 2 if autocast_bf16 else nbytes
    weights = rec["parameters"] * nbytes
    rec["weights_bytes"] = weights
    rec["dtype"] = model_dtype
    try:
        from rt_lib.mindskip.model import get_mindskip_model

        with quiet():
            ms = get_mindskip_model(meta, cfg.mindskip_config())
        routed = list(ms.routed_layers)
        router_params = sum(p.numel() for p in ms.router_parameters())
        ms.unload()
    except Exception as e:
        step["status"] = f"routers cannot be attached: {first_line(e)}"
        return step
    n_train = router_params
    if cfg.trainable == "full":
        n_train = rec["parameters"] + router_params
    elif cfg.trainable == "lora":
        n_train = router_params + _lora_parameters(meta, cfg)
    state_b = 4 if cfg.trainable == "routers" else nbytes  # routers are float32; others in the model dtype
    tokens = micro * cfg.max_length
    # an MoE layer keeps, per token, what its top-k experts and any shared expert keep: the
    # activations of a dense MLP of the active width (rt_lib.mindskip.moe.moe_parameters)
    act_shape = {**shape, "intermediate": rec["moe"]["active_mlp_width"]} if "moe" in rec else shape
    act = activation_bytes_per_token(act_shape, routed, cfg.granularity, cfg.route_level, act_b, cfg.trainable,
                                     cfg.max_length)
    logits = tokens * shape["vocab"] * 4
    loss = tokens * loss_bytes_per_token(shape["vocab"], act_b)
    trainable_bytes = {"weights": router_params * 4 if cfg.trainable != "full" else n_train * nbytes,
                       "gradients": n_train * state_b, "adamw_state": 2 * n_train * state_b}
    if cfg.trainable == "full":
        trainable_bytes["weights"] = 0  # already counted in the model's weights
    total = weights + act["per_token"] * tokens + loss + sum(trainable_bytes.values())
    step.update({
        "routed_layers": routed, "granularity": cfg.granularity, "route_level": cfg.route_level,
        "router_parameters": router_params, "trainable_parameters": n_train,
        "router_bytes": {"weights": router_params * 4, "gradients": router_params * 4,
                         "adamw_state": 2 * router_params * 4},
        "trainable_bytes": trainable_bytes,
        "weights_bytes": weights,
        "activation_dtype_bytes": act_b,
        "activations": {"tokens": tokens, "bytes_per_token": act["per_token"], "layers_keeping": act["layers_keeping"],
                        "bytes": act["per_token"] * tokens},
        "logits_bytes": logits, "loss_working_set_bytes": loss,
        "total_bytes": total,
        "fits": None if gpu["bytes"] is None else total <= gpu["bytes"],
    })
    return step


def _lora_parameters(meta, cfg) -> int:
    import torch

    n = 0
    for name, mod in meta.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in set(cfg.lora_target_modules):
            n += cfg.lora_r * (mod.in_features + mod.out_features)
    return n


def _eval_step(params: dict, rec, meta, tok, shape, gpu, eval_tokens, preset, missing, device) -> dict:
    from rt_lib.evaluation.tasks import task_set

    name = params.get("task_set", "quick")
    try:
        p = task_set(name)
    except ValueError as e:
        raise PlanInputError(str(e)) from e
    tasks, limit, batch = params.get("tasks"), params.get("limit"), params.get("batch_size", 8)
    dtype = resolve_dtype_name(params.get("dtype", "float32"), device)
    tasks_rec, m = resolve_tasks(name, tasks)
    missing += m
    step: dict[str, Any] = {"task_set": name, "batch_size": batch, "dtype": dtype, "limit": limit,
                            "thresholds": params.get("thresholds", [0.5]), **tasks_rec}
    if rec.get("parameters"):
        step["weights_bytes"] = rec["parameters"] * dtype_bytes(dtype)
    have_data = all(t["data"] != "missing" for t in tasks_rec["tasks"].values())
    small = limit is not None or all(p.limits.get(t) is not None for t in tasks_rec["tasks"])
    cmd = f"python -m rt_lib plan --preset {preset} --model {shlex.quote(rec['name'])} --eval-tokens yes"
    if not have_data:
        step["tokens"] = {"status": "needs the task data", "command": "; ".join(x["command"] for x in m) or None,
                          "then": cmd}
    elif meta is None or tok is None:
        step["tokens"] = {"status": "needs the model config and tokenizer"}
    elif eval_tokens == "no" or (eval_tokens == "auto" and not small):
        step["tokens"] = {"status": "not counted (whole splits: a few minutes of request building)", "command": cmd}
    else:
        try:
            counted = count_eval_tokens(meta, tok, name, tasks, limit, batch)
            step["tokens"] = {"status": "counted", **counted}
            if shape is not None and counted["total"]["max_len"]:
                from rt_lib.speed.roofline import estimate_point_bytes

                s = roofline_shape(shape)

                b = dtype_bytes(dtype)
                act = estimate_point_bytes(s, "prefill", batch, counted["total"]["max_len"], 0, b)
                step["peak_batch_bytes"] = act
                if step.get("weights_bytes") is not None:
                    step["total_bytes"] = step["weights_bytes"] + act
                    step["fits"] = None if gpu["bytes"] is None else step["total_bytes"] <= gpu["bytes"]
        except Exception as e:
            step["tokens"] = {"status": f"could not be counted: {first_line(e)}"}
    return step


def _profile_step(params: dict, cfg, rec, shape, gpu, device) -> dict:
    from rt_lib.speed.profiling import grid, grid_points
    from rt_lib.speed.roofline import estimate_kv_bytes, estimate_point_bytes

    name = params.get("profile_grid", "quick")
    over = {k: params[k] for k in ("skip_k", "repeats") if params.get(k) is not None}
    try:
        settings = grid(name, **over)
    except ValueError as e:
        raise PlanInputError(str(e)) from e
    dtype = resolve_dtype_name(params.get("dtype") or "auto", device)
    b = dtype_bytes(dtype)
    step: dict[str, Any] = {"grid": name, "dtype": dtype, "new_tokens": settings.new_tokens,
                            "skip_k": settings.skip_k, "warmup": settings.warmup, "repeats": settings.repeats,
                            "variants": list(params.get("variants") or settings.variants),
                            "headroom": settings.memory_headroom}
    points = grid_points(settings)
    if shape is None:
        step["points"] = [{"regime": r, "batch_size": bs, "seq_len": sl} for r, bs, sl in points]
        step["status"] = "needs the model config"
        return step
    s = roofline_shape(shape)
    weights = rec["parameters"] * b if rec.get("parameters") else None
    free = None if gpu["bytes"] is None or weights is None else gpu["bytes"] - weights
    k = settings.skip_k or 0
    if k >= shape["layers"]:
        raise PlanInputError(f"skip_k={k} is not below the model's {shape['layers']} layers: the profile skips "
                             "that many sublayers of the routed layers; pass a smaller 03_speedup_profiling.skip_k")
    kv_skips = cfg.granularity in ("attn", "block")
    rows = []
    for regime, batch, seq in points:
        new = settings.new_tokens if regime == "decode" else 0
        tokens = batch * (seq + new)
        need = estimate_point_bytes(s, regime, batch, seq, new, b)
        rows.append({"regime": regime, "batch_size": batch, "seq_len": seq, "new_tokens": new, "tokens": tokens,
                     "kv_bytes": estimate_kv_bytes(s, tokens, b),
                     "kv_bytes_skip": estimate_kv_bytes(s, tokens, b, shape["layers"] - k) if kv_skips else None,
                     "estimate_bytes": need,
                     "fits": None if free is None else need <= settings.memory_headroom * free})
    step.update(points=rows, weights_bytes=weights,
                not_fitting=sum(r["fits"] is False for r in rows) if free is not None else None)
    if "moe" in rec:
        moe = rec["moe"]
        step["note"] = (f"MoE model ({moe['experts']} experts, top-{moe['top_k']}): the keys and values are exact; a "
                        "point's activations count, per token, the expert-router logits and the inputs and "
                        f"intermediates of its {moe['top_k']} experts (rt_lib.speed.roofline.estimate_point_bytes)")
    return step


def run(preset: str = DEFAULT_PRESET, *, json_path: str | None = None, stream=None, **kwargs) -> int:
    """Make, print and optionally write the plan; returns the exit status (0, or 2 for bad input)."""
    stream = stream or sys.stdout
    try:
        plan = make_plan(preset, **kwargs)
    except PlanInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if json_path == "-":
        print(json.dumps(plan, indent=1, default=str), file=stream)
    else:
        print(format_plan(plan), file=stream)
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(plan, indent=1, default=str))
            print(f"\nwrote {json_path}", file=stream)
    return 0

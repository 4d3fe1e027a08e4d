"""The lm-evaluation-harness adapter: the ``mindskip`` harness model and harness task loading.

``MindSkipLM`` is HFLM over a model the kit loads or holds, with MindSkip routers attached or
not (registered as ``mindskip``; importing this module registers it). It only adapts: what a
request batch looks like to the routers (right padding masked out), skip counts per task, the
kit's model loading and data-parallel set-up. Running an evaluation, pairing variants and
writing result files is the driver's job (``rt_lib.evaluation.driver``), as the harness keeps
``models/huggingface.py`` apart from its evaluator.

    lm = MindSkipLM(pretrained=ms, tokenizer=tok, batch_size=8)   # or pretrained="<kit name>", routers=DIR
    lm_eval.simple_evaluate(model=lm, tasks=["rte_offline"], task_manager=task_manager())
    lm.capacities(); lm.skip_ratio()

Data-parallel runs (``accelerate launch`` / ``torchrun`` with ``WORLD_SIZE`` > 1): each process
loads the model onto its own device; skip counts are summed over processes (the harness pads
the shorter shards with repeats of their last request, which are counted too).

``task_manager`` and ``load_task`` give harness tasks: the kit's offline tasks (without indexing
the harness's standard ones) or the standard tasks; standard tasks get the per-document few-shot sampler
(``rt_lib.evaluation.tasks.samplers.DocSeededSampler``), so prompts do not depend on how documents are
dealt to processes.
"""

from __future__ import annotations

from contextlib import contextmanager

import hashlib
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from rt_lib.mindskip.model import MindSkipModel
from rt_lib.files import file_sha256
from rt_lib.evaluation.tasks import TaskSet, write_offline_tasks

log = logging.getLogger(__name__)

ALL_TASKS = "all tasks"  # skip-count key when MindSkipLM.skip_stats_per_task is off


def routers_sha256(ms) -> str:
    """sha256 over the router weights in layer order (float32 bytes): identifies in-memory routers."""
    h = hashlib.sha256()
    for key, t in sorted(ms.router_state_dict().items(), key=lambda kv: int(kv[0].split(".")[1])):
        h.update(key.encode())
        h.update(t.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _accelerator():
    """The accelerate Accelerator when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
    return acc if acc.num_processes > 1 else None


def pick_device(device: str | None) -> str:
    """The requested device, or CPU when it is CUDA on a machine without one (as HFLM does)."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            log.info("device %r requested but CUDA is not available: using cpu", device)
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


# ------------------------------------------------------------------------- harness model
# What a sequence router decides from when the harness scores (context, continuation):
# "context": the context's tokens only, as at a deployed model's prefill; each context is computed
#   once for all its continuations (rt_lib.evaluation.shared_context);
# "context+continuation": the whole request, one forward per request (HFLM's computation), so the
#   continuation being scored can change which layers run.
ROUTING_INPUTS = ("context", "context+continuation")


@register_model("mindskip")
class MindSkipLM(HFLM):
    """HFLM over a (MindSkip-routed) model loaded or held by the kit.

    ``pretrained``: embedded kit name / local folder / hub id (loaded with
    ``rt_lib.assets.loading.load_model``), or an in-memory HF model or ``MindSkipModel``.
    ``routers``: router checkpoint folder, attached with ``MindSkipModel.from_pretrained``
    (which refuses a checkpoint made for another model). ``threshold``: overrides the routers'.

    How log-likelihoods are computed (``routing_input``, ``ROUTING_INPUTS``): by default each
    context is prefilled once and its continuations scored on its KV cache, so a sequence router
    decides from the context alone, as a deployed model does at prefill
    (``rt_lib.evaluation.shared_context``; for a dense model the scores equal HFLM's to float
    tolerance). ``routing_input="context+continuation"`` is HFLM's computation, one forward per
    request, where a sequence router pools over the continuation too; there, with routers, the
    forward gets an attention mask for the right padding the harness adds to a batch (HFLM
    passes none), so a document's routing does not depend on its batch mates.

    Skip counts (executed / total routed sublayer units per layer) are kept per task in
    ``skip_counts``; for that, requests are scored task by task (``skip_stats_per_task``).
    """

    def __init__(
        self,
        pretrained: Any = "smollm2-135m-instruct",
        routers: str | os.PathLike | None = None,
        threshold: float | None = None,
        tokenizer: Any = None,
        dtype: str | torch.dtype | None = "float32",
        device: str | None = None,
        strict_base: bool = True,
        logits_where_read: bool = True,
        routing_input: str = "context",
        **kwargs,
    ) -> None:
        if routing_input not in ROUTING_INPUTS:
            raise ValueError(f"routing_input must be one of {list(ROUTING_INPUTS)}, got {routing_input!r}")
        ms = None
        self.model_name = None
        accelerator = None
        if isinstance(pretrained, str):
            from rt_lib.assets import loading as assets

            accelerator = _accelerator()
            dev = str(accelerator.device) if accelerator else pick_device(device)
            model, tok = assets.load_model(pretrained, dtype=dtype or "float32", device=dev)
            tokenizer = tokenizer if tokenizer is not None else tok
            self.model_name = pretrained
        elif isinstance(pretrained, MindSkipModel):
            ms, model = pretrained, pretrained.model
        elif isinstance(pretrained, torch.nn.Module):
            model = pretrained
        else:
            raise ValueError(f"pretrained must be a model name/folder, an HF model or a MindSkipModel, got {type(pretrained)}")
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer: pass tokenizer=...")
        self.routers_path = None
        if routers is not None:
            if ms is not None:
                raise ValueError("pretrained already carries routers (a MindSkipModel); do not also pass routers=")
            ms = load_routers(model, routers, strict_base=strict_base)
            self.routers_path = str(Path(routers).resolve())
        if threshold is not None:
            if ms is None:
                raise ValueError("threshold= needs routers: pass routers=<checkpoint dir> or a MindSkipModel")
            threshold = float(threshold)
            if not math.isfinite(threshold):
                raise ValueError(f"threshold must be a number (0 keeps everything, above 1 skips everything), got {threshold}")
            ms.set_threshold(threshold)
        self.model_name = self.model_name or getattr(model.config, "rt_kit_name", None) or getattr(model.config, "_name_or_path", "")
        super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
        if accelerator is not None:  # HFLM skips its data-parallel setup for a model object
            self.accelerator = accelerator
            self._device = accelerator.device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        self.mindskip = ms
        # per task: requests of different tasks never share a batch (a group of 57 MMLU subjects
        # then runs 57 small batches); evaluate() runs one task or group at a time and turns it off
        self.skip_stats_per_task = True
        self.skip_counts: dict[str, dict[int, list[float]]] = {}
        # the exact inputs of this call's requests -> longest continuation scored on them
        self._cont_lens: dict[tuple[int, ...], int] = {}
        # vocabulary logits only from the first continuation position of a batch on (the harness
        # reads no other); False: every position, as HFLM computes them
        self.logits_where_read = bool(logits_where_read)
        self.routing_input = routing_input

    # -- log-likelihoods -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.routing_input == "context+continuation":
            return self._whole_requests(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        from tqdm.auto import tqdm

        from rt_lib.evaluation.shared_context import score_shared_context

        bs = override_bs or self.batch_size
        bs = int(bs) if str(bs).isdigit() else 8  # contexts per prefill ("auto": 8)
        bar = tqdm(total=len(requests), desc="log-likelihoods (shared contexts)",
                   disable=disable_tqdm or self.rank != 0)
        try:
            with float32_logits(self.model):
                results, rest = score_shared_context(
                    self.model, [(ctx, cont) for _, ctx, cont in requests], batch_size=bs,
                    max_length=self.max_length, pad_id=0, device=self.device,
                    autocast_dtype=self.mixed_precision_dtype,
                    gates=self.mindskip.gates if self.mindskip is not None else None, on_batch=bar.update)
        finally:
            bar.close()
        if rest:  # too long for max_length: the harness's own truncation, one forward per request
            for i, r in zip(rest, self._whole_requests([requests[i] for i in rest], disable_tqdm=True,
                                                       override_bs=override_bs)):
                results[i] = r
        for (key, _, _), r in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    # -- routing-aware forward (one forward per request) ------------------------------------------
    def _whole_requests(self, requests, disable_tqdm: bool = False, override_bs=None):
        # the exact model inputs HFLM will build (context + continuation, minus the last token,
        # truncated from the left) and the continuation length scored on each
        self._cont_lens = {}
        for _, ctx, cont in requests:
            key = tuple((ctx + cont)[-(self.max_length + 1):][:-1])
            self._cont_lens[key] = max(self._cont_lens.get(key, 0), len(cont))
        try:
            with float32_logits(self.model):  # one float32 copy of the projection per pass
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._cont_lens = {}

    def _row_lengths(self, inps: torch.Tensor) -> list[int | None]:
        """Real length of each row of a right-padded batch (padding value 0), None if unknown.

        The real length of a row is the shortest L >= (last non-zero position + 1) whose
        prefix is one of the inputs of this call (a real input may itself end in token 0).
        Rows not found (e.g. the batch-size probe) are unknown.
        """
        width = inps.shape[1]
        lengths: list[int | None] = []
        for row in inps.tolist():
            end = width
            while end > 0 and row[end - 1] == 0:
                end -= 1
            lengths.append(next((n for n in range(max(end, 1), width + 1) if tuple(row[:n]) in self._cont_lens), None))
        return lengths

    def _padding_mask(self, inps: torch.Tensor, lengths: list[int | None]) -> torch.Tensor:
        """(B, T) mask of real tokens; rows of unknown length are taken as unpadded."""
        mask = torch.ones(inps.shape, dtype=torch.long, device=inps.device)
        for b, n in enumerate(lengths):
            if n is not None:
                mask[b, n:] = 0
        return mask

    def _logits_to_keep(self, inps: torch.Tensor, lengths: list[int | None]) -> int:
        """How many trailing positions of the batch hold every continuation the harness scores
        (its slice ``[inplen - contlen, inplen)`` of each row); 0 (all) if a row is unknown."""
        if not self.logits_where_read or any(n is None for n in lengths):
            return 0
        starts = [n - self._cont_lens[tuple(row[:n])] for row, n in zip(inps.tolist(), lengths)]
        return inps.shape[1] - min(starts)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        # the probe forwards of batch_size="auto" are not documents: keep them out of the skip counts
        if self.mindskip is None:
            return super()._detect_batch_size(requests, pos)
        saved = {i: (g.n_exec, g.n_total) for i, g in self.mindskip.gates.items()}
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            for i, g in self.mindskip.gates.items():
                g.n_exec, g.n_total = saved[i]

    def _model_call(self, inps, attn_mask=None, labels=None):
        """HFLM's forward, plus: right padding masked for the routers (a dense model needs no
        mask: causal attention keeps padding out of real positions), and vocabulary logits only
        at the trailing positions the harness reads (``_logits_to_keep``; the harness slices
        each row's continuation relative to the returned length, so fewer positions are exact)."""
        if attn_mask is not None or labels is not None:  # seq2seq models: HFLM's own call
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        lengths = self._row_lengths(inps) if self._cont_lens else [None] * inps.shape[0]
        mask = self._padding_mask(inps, lengths) if self.mindskip is not None else None
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                           enabled=self.mixed_precision_dtype is not None),
        ):
            return self.model(input_ids=inps, attention_mask=mask,
                              logits_to_keep=self._logits_to_keep(inps, lengths)).logits

    # -- per-task skip statistics ------------------------------------------------------------
    def _per_task(self, method, requests, **kwargs):
        ms = self.mindskip
        if ms is None or not requests:
            return method(requests, **kwargs)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[(req.task_name or "unknown") if self.skip_stats_per_task else ALL_TASKS].append(i)
        out: list[Any] = [None] * len(requests)
        delta: dict[str, dict[int, list[float]]] = {}
        for task, idx in groups.items():
            ms.reset_stats()
            res = method([requests[i] for i in idx], **kwargs)
            delta[task] = {i: [float(g.n_exec), float(g.n_total)] for i, g in ms.gates.items()}
            for i, r in zip(idx, res):
                out[i] = r
        if self.world_size > 1:
            from accelerate.utils import gather_object

            parts = gather_object([delta])
        else:
            parts = [delta]
        for part in parts:
            for task, layers in part.items():
                acc = self.skip_counts.setdefault(task, {})
                for layer, (ex, tot) in layers.items():
                    a = acc.setdefault(int(layer), [0.0, 0.0])
                    a[0] += ex
                    a[1] += tot
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._per_task(super().loglikelihood, requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._per_task(super().loglikelihood_rolling, requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._per_task(super().generate_until, requests, disable_tqdm=disable_tqdm)

    def reset_skip_counts(self) -> None:
        self.skip_counts = {}

    def capacities(self, tasks: Sequence[str] | None = None) -> dict[int, float]:
        """Executed fraction per routed layer, summed over ``tasks`` (default: all so far)."""
        tot: dict[int, list[float]] = {}
        for task, layers in self.skip_counts.items():
            if tasks is not None and task not in tasks:
                continue
            for layer, (ex, n) in layers.items():
                a = tot.setdefault(layer, [0.0, 0.0])
                a[0] += ex
                a[1] += n
        return {layer: (ex / n if n else math.nan) for layer, (ex, n) in sorted(tot.items())}

    def skip_ratio(self, tasks: Sequence[str] | None = None) -> float:
        ex = n = 0.0
        for task, layers in self.skip_counts.items():
            if tasks is None or task in tasks:
                for e, t in layers.values():
                    ex += e
                    n += t
        return 1.0 - ex / n if n else math.nan

    def get_model_info(self) -> dict:
        # HFLM's version asks the hub for a model sha; the kit records its own provenance
        model = self._model
        info = {
            "model_name": self.model_name,
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(next(model.parameters()).dtype),
            "routing_input": self.routing_input,
        }
        ms = self.mindskip
        if ms is not None:
            info["mindskip"] = {
                "routers": self.routers_path,
                "routers_sha256": file_sha256(Path(self.routers_path) / "routers.safetensors") if self.routers_path else None,
                "router_weights_sha256": routers_sha256(ms),
                "threshold": ms.config.threshold,
                "routed_layers": list(ms.routed_layers),
                "config": ms.config.to_dict(),
                "skip_ratio": {t: self.skip_ratio([t]) for t in self.skip_counts},
                "executed_fraction": {t: self.capacities([t]) for t in self.skip_counts},
            }
        return info


def load_routers(model, routers: str | os.PathLike, strict_base: bool = True):
    """Attach a router checkpoint to ``model``; a clear ValueError if it does not fit."""
    try:
        return MindSkipModel.from_pretrained(model, routers, strict_base=strict_base)
    except FileNotFoundError as e:
        raise ValueError(f"{e}. Pass routers=<folder written by MindSkipModel.save_pretrained>.") from e
    except ValueError as e:
        raise ValueError(
            f"{e}. Evaluate these routers with the model they were tuned on (pretrained=...), "
            "or tune routers for this model first."
        ) from e


# ------------------------------------------------------------------------- harness tasks
_TASK_MANAGERS: dict[str, Any] = {}


def task_manager(offline: bool = True):
    """A harness TaskManager, one per process and kind (cached).

    ``offline=True``: the kit's offline tasks only (``rte_offline``, ``mmlu_offline``, ...). Their
    YAMLs are complete, so the harness's own ~14,000 task YAMLs are not indexed, which takes 10-30
    s; a YAML file loaded by path may still ``include`` a standard task's file. ``offline=False``:
    the harness's standard tasks (the ``paper`` preset)."""
    from lm_eval.tasks import TaskManager

    include = str(write_offline_tasks()) if offline else ""
    if include not in _TASK_MANAGERS:
        _TASK_MANAGERS[include] = (TaskManager(include_path=include, include_defaults=False) if include
                                   else TaskManager())
    return _TASK_MANAGERS[include]


def seed_fewshot_per_document(task) -> None:
    """Give a standard task the per-document sampler (offline YAMLs carry it already)."""
    from lm_eval.api.samplers import ContextSampler

    from rt_lib.evaluation.tasks.samplers import DocSeededSampler

    sampler = getattr(task, "sampler", None)
    if sampler is None or type(sampler) is not ContextSampler:  # first_n (MMLU) or already ours
        return
    new = DocSeededSampler(list(sampler.df), rnd=None, fewshot_indices=sampler.fewshot_indices)
    task.sampler = new
    original = task.fewshot_context

    def fewshot_context(doc, *args, **kwargs):
        new.current_doc = doc
        try:
            return original(doc, *args, **kwargs)
        finally:
            new.current_doc = None

    task.fewshot_context = fewshot_context


@contextmanager
def float32_logits(model):
    """Within the block, a half-precision model computes its output projection in float32.

    A bfloat16 logit near 20 is rounded to a multiple of 0.125; summed over a continuation's
    tokens, such errors tie or swap the log-likelihoods of close answer choices (BoolQ's
    " yes"/" no" are one token each). The hidden state stays as the model computed it; only
    the projection (``get_output_embeddings``) and what follows it (log-softmax, sums) run in
    float32, which costs little because only the positions the harness reads are projected.
    The float32 copy of the projection weight is made once on entry (the wrapper enters once
    per loglikelihood pass, not per batch) and the half-precision product is not computed. A
    head with a forward of its own (an accelerate device or offload hook) or a weight not
    materialised (``meta``) keeps its forward, and a hook recomputes its output in float32.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.dtype == torch.float32 or not weight.is_floating_point():
        yield
        return
    if weight.is_meta or "forward" in head.__dict__:
        def recompute(module, args, output):
            bias = module.bias.float() if getattr(module, "bias", None) is not None else None
            return torch.nn.functional.linear(args[0].float(), module.weight.float(), bias)

        handle = head.register_forward_hook(recompute)
        try:
            yield
        finally:
            handle.remove()
        return
    w32 = weight.detach().float()
    b32 = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
    head.forward = lambda x: torch.nn.functional.linear(x.float(), w32, b32)
    try:
        yield
    finally:
        del head.forward


_ENV_INFO: dict = {}


@contextmanager
def env_info_once():
    """Within the block, the harness's environment record (``pretty_env_info``: torch's
    ``collect_env``, about a dozen subprocesses, 0.6 s) is collected once per process and
    copied into every later result: it cannot change within a process, and an evaluation makes
    one harness call per task and variant (24 in the main job)."""
    import copy
    from unittest import mock

    import lm_eval.evaluator as harness_evaluator

    collect = harness_evaluator.add_env_info

    def once(storage: dict) -> None:
        if not _ENV_INFO:
            collect(_ENV_INFO)
        storage.update(copy.deepcopy(_ENV_INFO))

    with mock.patch.object(harness_evaluator, "add_env_info", once):
        yield


def leaf_tasks(obj) -> list:
    """The tasks of a harness group (e.g. the 57 MMLU subjects), or ``[obj]`` for a task."""
    from lm_eval.api.group import Group

    return list(obj.get_all_tasks()) if isinstance(obj, Group) else [obj]


def load_task(tm, p: TaskSet, task: str) -> tuple[str, Any]:
    """The harness task (or group) of a task set's standard task name, ready to evaluate: the
    standard tasks get the per-document few-shot sampler (the offline ones have it built in)."""
    harness_name = p.harness_task(task)
    import contextlib
    from unittest import mock

    import datasets.config

    # local files: no download-count request to the hub per data set (one per MMLU subject)
    with (mock.patch.object(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False) if p.offline
          else contextlib.nullcontext()):
        loaded = tm.load([harness_name])
    obj = loaded["groups"].get(harness_name) or loaded["tasks"][harness_name]
    if not p.offline:
        for leaf in leaf_tasks(obj):
            seed_fewshot_per_document(leaf)
    return harness_name, obj

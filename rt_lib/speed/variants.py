"""The variants the profiler times, all on the weights of one MindSkip model.

Each `Variant` puts the shared model into one state on `enter` and undoes it on `exit`
(outside the timed region): the plain base model (`dense`), MindSkip with forced or routed
decisions (`mindskip_forced`, `mindskip`), compute-then-mask (`mask`), or the base model with
sublayers physically removed (`oracle`, `static_drop`). Because no variant runs on a copy,
differences in allocation or memory layout cannot show up as speed differences.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rt_lib.mindskip.config import KV_GRANULARITIES

log = logging.getLogger(__name__)

VARIANTS = ("dense", "mindskip_forced", "mindskip", "oracle", "mask", "static_drop")


@dataclass
class Variant:
    name: str
    model: torch.nn.Module          # the HF model to call while active
    enter: Callable[[], object]     # put `model` in this variant's state
    exit: Callable[[], None]
    skip_ratio: Callable[[], float]  # realised skip ratio of the last timed call
    reset: Callable[[], None] = lambda: None  # clears skip statistics before a timed call
    # per layer, the fraction of its `granularity` sublayer executions skipped in the last timed
    # call (the measured bound adds up the dense model's time of exactly these)
    skipped: Callable[[], dict[int, float]] = dict
    granularity: str = "attn"
    # decode may rewind a prefilled cache instead of prefilling again each round; what the
    # variant keeps beside its cache (the gates' decisions) is saved and put back with it
    rewindable: bool = True
    save_state: Callable[[], object] = lambda: None
    restore_state: Callable[[object], None] = lambda state: None

    @contextlib.contextmanager
    def active(self):
        self.enter()
        try:
            yield self.model
        finally:
            self.exit()


def prepare_models(model, routers: str | None = None, config=None):
    """`model` wrapped with MindSkip in place: routers from a checkpoint folder, or fresh
    (zero-init) ones from `config`. Every variant of the profile runs on these same weights."""
    from rt_lib.mindskip.config import MindSkipConfig
    from rt_lib.mindskip.model import MindSkipModel, get_mindskip_model

    if routers:
        ms = MindSkipModel.from_pretrained(model, routers)
    else:
        ms = get_mindskip_model(model, config or MindSkipConfig())
    ms.eval()
    return ms


def build_variants(ms, names, skip_layers, static_layers=None, threshold=None) -> list[Variant]:
    """The profiled variants, all on the weights of one MindSkip model `ms` (so that no variant
    runs on a differently allocated copy). `skip_layers` (routed layers) are skipped by
    mindskip_forced and mask and removed by the oracle, at the routers' granularity;
    `static_layers` lose their attention in static_drop."""
    routed = list(ms.routed_layers)
    bad = sorted(set(skip_layers) - set(routed))
    if bad:
        raise ValueError(f"skip_layers {bad} are not routed layers {routed}")
    forced = {layer: layer not in skip_layers for layer in routed}
    n_routed = len(routed)
    if threshold is not None:
        ms.set_threshold(threshold)
    out = []
    for name in names:
        if name == "static_drop" and not static_layers:
            log.warning("static_drop: no layer list (static_layers) and none from rt_lib.tuning.baselines; omitted")
            continue
        if name in ("dense", "oracle", "static_drop"):
            drop = {"dense": (), "oracle": skip_layers, "static_drop": static_layers}[name]
            # the oracle removes what the routers gate; static drop removes attention whatever they gate
            granularity = ms.config.granularity if name == "oracle" else "attn"
            out.append(_plain_variant(ms, name, drop, granularity, len(drop) / n_routed))
        elif name in ("mindskip_forced", "mindskip", "mask"):
            decisions = None if name == "mindskip" else forced
            out.append(_mindskip_variant(ms, name, decisions, "mask" if name == "mask" else "skip", skip_layers))
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return out


def _mindskip_variant(ms, name, decisions, execution, skip_layers) -> Variant:
    """MindSkip with `decisions` forced (None: the routers decide) in `execution` mode. Its
    skipped sublayers: the routers' per-layer skipped fraction, or the forced `skip_layers`
    (for `mask`: what skipping them for real would save)."""
    def enter():
        ms.set_execution(execution)
        ms.force(decisions)

    def exit():
        ms.force(None)
        ms.set_execution("skip")

    def skipped():
        if decisions is not None:
            return {int(layer): 1.0 for layer in skip_layers}
        return {int(layer): 1.0 - c for layer, c in ms.capacities().items() if c == c}
    # a rewound cache decodes as a fresh prefill would when the gates keep nothing per cache
    # position: sequence routing (one decision per row, saved and put back) and token routing of
    # position-wise sublayers (mlp, moe: every layer caches every token); token routing of
    # attention keeps a key history per cache slot, which a rewind would leave behind
    rewindable = ms.config.route_level == "seq" or ms.config.granularity not in KV_GRANULARITIES
    return Variant(name, ms.model, enter, exit, lambda: float(ms.skip_ratio()), ms.reset_stats, skipped,
                   ms.config.granularity, rewindable=rewindable,
                   save_state=ms.decode_state, restore_state=ms.restore_decode_state)


def _plain_variant(ms, name, drop, granularity, skip_ratio: float) -> Variant:
    """The base model on the same weights (gates taken out), with the `granularity` sublayers
    of the layers in `drop` removed."""
    from rt_lib.mindskip.removal import drop_sublayers

    stack = []

    def enter():
        st = contextlib.ExitStack()
        st.enter_context(ms.detached())  # same weights, plain base model
        if drop:
            st.callback(drop_sublayers(ms.model, list(drop), granularity=granularity).restore)
        stack.append(st)

    def exit():
        stack.pop().close()
    return Variant(name, ms.model, enter, exit, lambda: skip_ratio,
                   skipped=lambda: {int(layer): 1.0 for layer in drop}, granularity=granularity)


def choose_skip_layers(ms, input_ids: torch.Tensor, k: int | None) -> list[int]:
    """The routed layers to force-skip and remove in the oracle. With `k`: the k layers the
    routers skip most often on `input_ids` (ties: deeper first). Without: every layer the
    routers skip for all sequences of `input_ids`."""
    ms.force(None)
    ms.set_execution("skip")
    ms.reset_stats()
    with torch.inference_mode():
        ms.model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    executed = {int(layer): float(v) for layer, v in ms.capacities().items()}
    ms.reset_stats()
    if k is None:
        return sorted(layer for layer, v in executed.items() if v == 0.0)
    ranked = sorted(ms.routed_layers, key=lambda layer: (executed.get(layer, 1.0), -layer))
    return sorted(ranked[:k])


def baseline_static_layers(ms, k: int) -> list[int] | None:
    """The static attention drop's own choice of k layers (rt_lib.tuning.baselines: 1 - cos importance
    on calibration text); None, and the variant is omitted, when it cannot be had."""
    from rt_lib.tuning.baselines import static_drop_layers

    try:
        with ms.detached():
            return list(static_drop_layers(ms.model, k))
    except Exception as exc:  # noqa: BLE001 - an optional comparison must not stop the profile
        log.warning("static_drop: rt_lib.tuning.baselines could not choose layers (%s: %s)", type(exc).__name__, exc)
        return None

"""MindSkipConfig: where routers go and how they decide (paper section 3)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

GRANULARITIES = ("attn", "mlp", "block", "moe")
# Granularities whose skipped sublayer stores no keys/values (a skip changes the layer's KV cache);
# `mlp` and `moe` gate position-wise sublayers that never touch the cache.
KV_GRANULARITIES = ("attn", "block")
ROUTE_LEVELS = ("seq", "token")
ROUTER_DTYPES = ("float32", "bfloat16", "float16")
REG_FORMS = ("layer", "global")


@dataclass
class MindSkipConfig:
    num_routed_layers: int = field(
        default=16,
        metadata={"help": "Route the n deepest layers except the very last: layers L-1-n .. L-2."},
    )
    routed_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Explicit list of layer indices to route; overrides num_routed_layers."},
    )
    granularity: str = field(
        default="attn",
        metadata={"help": "Which sublayer the router gates: attn (the paper's MindSkip), mlp (a dense MLP), block, "
                          "or moe (the sparse mixture-of-experts block of an MoE model: router and experts)."},
    )
    route_level: str = field(
        default="seq",
        metadata={"help": "seq: one decision per sequence (from the mask-weighted mean input); token: one per token."},
    )
    threshold: float = field(
        default=0.5,
        metadata={"help": "A sublayer runs when sigmoid(w . x) >= threshold. 0 keeps all, >1 skips all."},
    )
    router_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of router weights and of the score computation."},
    )
    capacity_target: float = field(
        default=0.5,
        metadata={"help": "Target capacity s of the regulariser ReLU(capacity_l - s)."},
    )
    reg_lambda: float = field(
        default=0.01,
        metadata={"help": "Weight lambda of the capacity regulariser; 0 disables it."},
    )
    reg_form: str = field(
        default="layer",
        metadata={"help": "layer: lambda * sum_l ReLU(capacity_l - s), every routed layer held to s; global: "
                          "lambda * n * ReLU(mean_l capacity_l - s), one budget the routers share out."},
    )
    router_init: float = field(
        default=0.5,
        metadata={"help": "Router score before tuning, sigmoid(b): 0.5 = zero-initialised routers without a bias "
                          "(every score at the default threshold); another value gives each router a bias b so "
                          "tuning starts away from the threshold."},
    )

    def __post_init__(self):
        _check_types(self)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.route_level not in ROUTE_LEVELS:
            raise ValueError(f"route_level must be one of {ROUTE_LEVELS}, got {self.route_level!r}")
        if self.router_dtype not in ROUTER_DTYPES:
            raise ValueError(f"router_dtype must be one of {ROUTER_DTYPES}, got {self.router_dtype!r}")
        if self.routed_layers is not None:
            self.routed_layers = sorted({int(i) for i in self.routed_layers})
            if not self.routed_layers:
                raise ValueError("routed_layers is empty: route at least one layer (or pass None for the default)")
        elif self.num_routed_layers < 1:
            raise ValueError(f"num_routed_layers must be >= 1, got {self.num_routed_layers}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1] (a score sigmoid(w.x) is compared with it), "
                             f"got {self.threshold!r}")
        if not 0.0 <= self.capacity_target <= 1.0:
            raise ValueError(f"capacity_target must be in [0, 1], got {self.capacity_target}")
        if not (isinstance(self.reg_lambda, (int, float)) and math.isfinite(self.reg_lambda) and self.reg_lambda >= 0):
            raise ValueError(f"reg_lambda must be a finite number >= 0, got {self.reg_lambda!r}")
        if self.reg_form not in REG_FORMS:
            raise ValueError(f"reg_form must be one of {REG_FORMS}, got {self.reg_form!r}")
        if not (isinstance(self.router_init, (int, float)) and 0.0 < self.router_init < 1.0):
            raise ValueError(f"router_init must be a score strictly between 0 and 1, got {self.router_init!r}")

    @property
    def router_bias(self) -> bool:
        """Routers carry a bias (initialised to logit(router_init)) unless router_init is 0.5."""
        return self.router_init != 0.5

    def resolve_layers(self, num_layers: int, exclude=()) -> list[int]:
        """Layer indices to route for a model with `num_layers` decoder layers.

        The default (no explicit `routed_layers`) is the `num_routed_layers` deepest layers
        except the last, minus the layers in `exclude` (layers the model cannot have routed,
        see `mindskip.routed_layers_for`). An explicit list is returned as given; checking it
        against `exclude` is the caller's job, so that the error can say why.
        """
        if self.routed_layers is not None:
            bad = [i for i in self.routed_layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"routed_layers {bad} do not exist in a model with {num_layers} layers (0..{num_layers - 1})")
            return list(self.routed_layers)
        n = self.num_routed_layers
        if n > num_layers - 2:
            raise ValueError(
                f"num_routed_layers={n} is too many for {num_layers} layers: the default keeps the first and the "
                f"last layer dense, so at most {num_layers - 2}; pass routed_layers explicitly otherwise"
            )
        excluded = set(exclude)
        layers = [i for i in range(num_layers - 1 - n, num_layers - 1) if i not in excluded]
        if not layers:
            raise ValueError(f"no layer of the default range {num_layers - 1 - n}..{num_layers - 2} can be routed "
                             f"(excluded: {sorted(excluded)}); pass routed_layers explicitly")
        return layers

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MindSkipConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MindSkipConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MindSkipConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> documentation, for CLIs and notebooks."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


_NUMBERS = ("threshold", "capacity_target", "reg_lambda", "router_init")


def _check_types(cfg: MindSkipConfig) -> None:
    """Types and finiteness of every field, before any range check (a config read from a file
    may hold strings, NaN or booleans where numbers belong)."""
    for name in _NUMBERS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if isinstance(cfg.num_routed_layers, bool) or not isinstance(cfg.num_routed_layers, int):
        raise ValueError(f"num_routed_layers must be an integer, got {cfg.num_routed_layers!r}")
    if cfg.routed_layers is not None and (not isinstance(cfg.routed_layers, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in cfg.routed_layers)):
        raise ValueError(f"routed_layers must be a list of layer indices, got {cfg.routed_layers!r}")
    for name in ("granularity", "route_level", "router_dtype", "reg_form"):
        if not isinstance(getattr(cfg, name), str):
            raise ValueError(f"{name} must be a string, got {getattr(cfg, name)!r}")

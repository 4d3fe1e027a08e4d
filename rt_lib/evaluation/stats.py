"""Paired statistics: the difference between two models scored on the same documents.

Two models evaluated on the same n documents give per-document scores x_i (variant) and
y_i (dense). Their accuracies' independent error bars (each about sqrt(p(1-p)/n)) ignore
that both models get most documents right or wrong together; the difference
d_i = x_i - y_i has a far smaller spread, so the paired interval

    mean(d) +- t_{(1+c)/2, n-1} * sd(d) / sqrt(n)

is much tighter (and is the right one for "did routing cost accuracy?"). A percentile
bootstrap over documents is offered as a check that does not lean on the t approximation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats


@dataclass(frozen=True)
class PairedDifference:
    diff: float  # mean of variant - reference over the paired documents
    ci_low: float
    ci_high: float
    n: int  # paired documents
    se: float  # standard error of diff
    confidence: float
    method: str  # "t", "bootstrap" or "normal" (combined over tasks)

    def to_dict(self) -> dict:
        return asdict(self)


def pair_scores(
    variant: Mapping[Hashable, float], reference: Mapping[Hashable, float]
) -> tuple[list[Hashable], np.ndarray, np.ndarray]:
    """Align two ``{doc key: score}`` maps; every key must be scored by both."""
    only_v = set(variant) - set(reference)
    only_r = set(reference) - set(variant)
    if only_v or only_r:
        raise ValueError(
            f"paired comparison needs the same documents: {len(only_v)} scored only by the variant "
            f"(e.g. {sorted(map(str, only_v))[:3]}), {len(only_r)} only by the reference "
            f"(e.g. {sorted(map(str, only_r))[:3]}); evaluate both with the same task set, tasks and limit"
        )
    try:
        keys = sorted(variant)
    except TypeError:  # mixed key types
        keys = sorted(variant, key=repr)
    x = np.array([float(variant[k]) for k in keys], dtype=np.float64)
    y = np.array([float(reference[k]) for k in keys], dtype=np.float64)
    return keys, x, y


def paired_difference(
    variant: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    method: str = "t",
    n_boot: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """Mean of ``variant - reference`` with a ``confidence`` interval (t or percentile bootstrap)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(variant, dtype=np.float64)
    y = np.asarray(reference, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"need two 1-D arrays of equal length, got shapes {x.shape} and {y.shape}")
    n = int(x.size)
    if n == 0:
        raise ValueError("no paired documents")
    d = x - y
    mean = float(d.mean())
    if n == 1:
        return PairedDifference(mean, math.nan, math.nan, 1, math.nan, confidence, method)
    se = float(scipy_stats.sem(d))
    if method == "t":
        # mean +- t * se rather than ttest_rel(...).confidence_interval: the same interval, but
        # scipy's differs in the last bit for about half of all inputs, and paired.csv records it
        half = float(scipy_stats.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * se
        return PairedDifference(mean, mean - half, mean + half, n, se, confidence, "t")
    if method == "bootstrap":
        # resampled here rather than with scipy.stats.bootstrap, which draws its resamples in a
        # different order: the same seed would give other intervals than the ones recorded
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n))
        boots = d[idx].mean(axis=1)
        lo, hi = np.quantile(boots, [0.5 - confidence / 2.0, 0.5 + confidence / 2.0])
        return PairedDifference(mean, float(lo), float(hi), n, float(boots.std(ddof=1)), confidence, "bootstrap")
    raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")


def se_from_interval(ci_low: float, ci_high: float, n: int, confidence: float) -> float:
    """The standard error behind a paired t interval (``paired_difference``'s default):
    half-width / t quantile with n - 1 degrees of freedom; NaN when it cannot be told."""
    if n < 2 or ci_low != ci_low or ci_high != ci_high:
        return math.nan
    return (ci_high - ci_low) / 2 / float(scipy_stats.t.ppf(0.5 + confidence / 2.0, n - 1))


def macro_difference(parts: Sequence[PairedDifference], confidence: float | None = None) -> PairedDifference:
    """Unweighted mean of per-task paired differences, tasks being independent samples.

    se = sqrt(sum se_t^2) / k with a normal interval (each task's se already reflects its own
    document count; with k tasks the sum has many degrees of freedom).
    """
    if not parts:
        raise ValueError("no tasks to average")
    confidence = parts[0].confidence if confidence is None else confidence
    k = len(parts)
    diff = sum(p.diff for p in parts) / k
    se = math.sqrt(sum(p.se**2 for p in parts)) / k
    if math.isnan(se):
        return PairedDifference(diff, math.nan, math.nan, sum(p.n for p in parts), se, confidence, "normal")
    half = float(scipy_stats.norm.ppf(0.5 + confidence / 2.0)) * se
    return PairedDifference(diff, diff - half, diff + half, sum(p.n for p in parts), se, confidence, "normal")


def macro_stderr(stderrs: Sequence[float]) -> float:
    """Standard error of an unweighted mean of k independent task scores."""
    k = len(stderrs)
    return math.sqrt(sum(s * s for s in stderrs)) / k if k else math.nan

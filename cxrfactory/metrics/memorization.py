"""The memorization audit's rule: which synthetic images are near-copies of training images.

Inputs, per space (``feature``: unit-length classifier features; ``pixel``: 32x32 thumbnails in
[0, 1]), all measured to the nearest *training* image (:mod:`cxrfactory.metrics.nearest`):

- ``held_out``: the distance of every held-out real image (a split patient-disjoint from
  training, e.g. NIH's test split), and a boolean ``fold`` per held-out image (a hash of its
  patient, from the caller) for the cross-fitted estimate below;
- ``distances``: the distance of every synthetic image.

The rule. A synthetic image is a near-copy when, in *either* space, its distance to the nearest
training image is below that space's threshold: the ``percentile``-th percentile (default 1, the
1st percentile) of the held-out images' nearest-training distances in that space.

Why. A new patient's image is as close to the training set as real, uncopied data gets. A
generator that learned the distribution without copying makes images about as close as new
patients; one that copies makes images closer than almost every new patient. So the held-out
distances are the null distribution, and being closer than 99% of new patients is evidence of
copying. This is the idea behind the data-copying test of Meehan, Chaudhuri and Dasgupta (AISTATS
2020), which compares generated-to-training against held-out-to-training nearest-neighbour
distances, and behind the "distance to closest record" (DCR) of the synthetic-data privacy
literature (Park et al., table-GAN, PVLDB 2018), read against the same distance for real
held-out records. Two spaces because they miss different copies: features see a copied anatomy
under new contrast or noise; pixels see a near-verbatim copy whatever the classifier ignores.

What the flags mean. The rule flags some new patients too (a percentile is a percentile), so a
synthetic set's flag rate is read against the rate expected when nothing is copied.
:func:`false_flag_rate` estimates that rate honestly by cross-fitting: thresholds from fold A's
held-out images flag fold B's, and vice versa; the two rates are averaged. In-sample it would be
the percentile by construction; out of sample it is larger (a percentile estimated from a
finite sample) and, because the rule takes the union of two spaces, up to about twice the
percentile when the spaces disagree about which images are close. A flagged synthetic image is
a candidate to look at, beside its nearest training image, not a verdict; a flag rate well above
the false-flag rate is the set-level evidence.

Limits. The rule sees only copies closer than real neighbours; it says nothing about a
generator that collapses to a few modes far from any training image. The held-out split must be
patient-disjoint from training: a training patient's follow-up study sits much closer than a new
patient, which would lower the thresholds and hide copies.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cxrfactory.errors import UserError

__all__ = ["AuditRule", "MemorizationError", "distance_summary", "false_flag_rate", "flag",
           "thresholds"]

#: The keys of :func:`distance_summary`, in order.
SUMMARY_KEYS = ("n", "min", "p1", "p5", "p25", "median", "mean")


class MemorizationError(UserError, ValueError):
    """An audit rule or audit inputs that cannot be used as given."""


@dataclass(frozen=True)
class AuditRule:
    """When a synthetic image counts as a near-copy of a training image."""

    # Threshold per space, as a percentile (0-100) of the held-out nearest-training distances:
    # 1.0 flags what is closer than 99% of new patients.
    percentile: float = 1.0
    # The spaces measured; an image closer than the threshold in any one of them is flagged.
    spaces: tuple[str, ...] = ("feature", "pixel")

    def __post_init__(self) -> None:
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p < 50:
            # Below 50: a threshold at the median or above would flag a typical new patient.
            raise MemorizationError(f"the audit percentile must be a number between 0 and 50 "
                                    f"(exclusive), e.g. 1.0; got {p!r}")
        object.__setattr__(self, "percentile", float(p))
        spaces = tuple(self.spaces) if not isinstance(self.spaces, str) else (self.spaces,)
        if not spaces or not all(isinstance(s, str) and s for s in spaces):
            raise MemorizationError(f"the audit needs one or more named spaces, "
                                    f"got {self.spaces!r}")
        if len(set(spaces)) != len(spaces):
            raise MemorizationError(f"the audit's spaces repeat: {spaces}")
        object.__setattr__(self, "spaces", spaces)  # a list given by a caller, kept as a tuple


def _distances(d: np.ndarray, what: str) -> np.ndarray:
    """``d`` as a 1-D float64 array of finite, non-negative distances."""
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 1:
        raise MemorizationError(f"{what} must be a 1-D array of distances, got shape {d.shape}")
    if not np.isfinite(d).all() or (d < 0).any():
        raise MemorizationError(f"{what} holds NaN, infinite or negative distances")
    return d


def _per_space(rule: AuditRule, values: Mapping[str, np.ndarray], what: str,
               *, allow_empty: bool) -> dict[str, np.ndarray]:
    """The rule's spaces from ``values``, checked, all of one length (the same images)."""
    missing = [s for s in rule.spaces if s not in values]
    if missing:
        raise MemorizationError(f"{what} lacks the space(s) {missing}; the rule measures "
                                f"{list(rule.spaces)}")
    out = {s: _distances(values[s], f"{what} ({s})") for s in rule.spaces}
    lengths = {s: len(d) for s, d in out.items()}
    if len(set(lengths.values())) > 1:
        raise MemorizationError(f"{what} must hold one distance per image in every space; "
                                f"lengths differ: {lengths}")
    if not allow_empty and not next(iter(lengths.values())):
        raise MemorizationError(f"{what} is empty: the thresholds need held-out real images")
    return out


def thresholds(rule: AuditRule, held_out: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per space, the rule's percentile of the held-out images' nearest-training distances
    (NumPy's default linear interpolation between order statistics)."""
    held = _per_space(rule, held_out, "the held-out distances", allow_empty=False)
    return {s: float(np.percentile(d, rule.percentile)) for s, d in held.items()}


def flag(rule: AuditRule, thresholds: Mapping[str, float],
         distances: Mapping[str, np.ndarray]) -> np.ndarray:
    """True for each image closer than its space's threshold in any of the rule's spaces
    (strictly: an image exactly at a held-out image's distance is as close as a new patient)."""
    missing = [s for s in rule.spaces if s not in thresholds]
    if missing:
        raise MemorizationError(f"no threshold for the space(s) {missing}")
    limits = {s: float(thresholds[s]) for s in rule.spaces}
    if not all(math.isfinite(t) for t in limits.values()):
        raise MemorizationError(f"the thresholds must be finite, got {limits}")
    dist = _per_space(rule, distances, "the distances", allow_empty=True)
    flagged = np.zeros(len(next(iter(dist.values()))), dtype=bool)
    for s, d in dist.items():
        flagged |= d < limits[s]
    return flagged


def false_flag_rate(rule: AuditRule, held_out: Mapping[str, np.ndarray],
                    fold: np.ndarray) -> float | None:
    """The share of new patients the rule flags, cross-fitted over the two folds of the
    held-out images (thresholds from one fold, flags on the other, both ways, averaged);
    None when a fold is empty."""
    held = _per_space(rule, held_out, "the held-out distances", allow_empty=False)
    n = len(next(iter(held.values())))
    fold = np.asarray(fold)
    if fold.dtype != np.bool_ or fold.shape != (n,):
        raise MemorizationError(f"the fold must be a boolean array with one entry per held-out "
                                f"image ({n}), got {fold.dtype} with shape {fold.shape}")
    if fold.all() or not fold.any():
        return None
    rates = []
    for fit, test in ((fold, ~fold), (~fold, fold)):
        limits = thresholds(rule, {s: d[fit] for s, d in held.items()})
        rates.append(float(flag(rule, limits, {s: d[test] for s, d in held.items()}).mean()))
    return sum(rates) / 2


def distance_summary(d: np.ndarray) -> dict[str, float | int | None]:
    """``n``, ``min``, ``p1``, ``p5``, ``p25``, ``median`` and ``mean`` of distances; every value
    but ``n`` (an int) is a float, or None when there are none."""
    d = _distances(d, "the distances")
    if not len(d):
        return {"n": 0, **{k: None for k in SUMMARY_KEYS[1:]}}
    p1, p5, p25, median = (float(v) for v in np.percentile(d, [1, 5, 25, 50]))
    return {"n": int(len(d)), "min": float(d.min()), "p1": p1, "p5": p5, "p25": p25,
            "median": median, "mean": float(d.mean())}

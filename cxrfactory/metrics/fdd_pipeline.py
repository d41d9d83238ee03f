"""FDD's sides: a feature bank's rows -> per-class statistics and patient halves.

The features come from :mod:`cxrfactory.metrics.bank` (each image embedded once per
classifier); a side's statistics are the exact float64 sums of ``FeatureStats`` over its rows,
keyed by class, and for the real side also by patient half (the floor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cxrfactory.errors import UserError
from cxrfactory.metrics.bank import BankArrays
from cxrfactory.metrics.stats import FeatureStats
from cxrfactory.raydata import stable_fraction

HALF_SALT = "cxrfactory-fdd-half"  # which patients form each half of the floor
HALVES = ("a", "b")


class FDDError(UserError, ValueError):
    """Input FDD cannot measure: a class without rows, a stale cache, a broken classifier."""


def half_of(patient_ids: Sequence[str]) -> np.ndarray:
    """True for the rows of the first patient-disjoint half (a hash of the patient id)."""
    return stable_fraction(list(patient_ids), HALF_SALT) < 0.5


def side_stats(rows: BankArrays, classes: Sequence[str], *, halves: bool) -> "SideStats":
    """A side's per-class statistics, keyed ``class`` or, with ``halves``, ``class/half``."""
    rows = rows.take(np.isin(rows.label, list(classes)))
    keys = [str(k) for k in rows.label]
    if halves:
        first = half_of(rows.patient_id)
        keys = [f"{k}/{HALVES[0] if h else HALVES[1]}" for k, h in zip(keys, first)]
    stats = FeatureStats(dim=rows.feature.shape[1])
    if len(rows):
        stats.update(rows.feature.astype(np.float64), keys)
    return SideStats(stats)


@dataclass
class SideStats:
    """Merged statistics of one side, keyed by class (or ``class/half``)."""

    stats: FeatureStats

    def by_class(self, half: str | None = None) -> FeatureStats:
        """Statistics per class: the halves merged (exactly), or one half only."""
        return _relabel(self.stats, lambda key: _class_of(key, half))


def _class_of(key: str, half: str | None) -> str | None:
    label, _, which = key.partition("/")
    return label if half is None or which == half else None


def _relabel(stats: FeatureStats, mapping: Callable[[str], str | None]) -> FeatureStats:
    arrays = stats.to_arrays()
    names = [mapping(str(k)) for k in arrays["label"]]
    keep = np.array([n is not None for n in names], dtype=bool)
    arrays = {k: v[keep] for k, v in arrays.items()}
    arrays["label"] = np.array([n for n in names if n is not None], dtype=str)
    merged = FeatureStats.from_arrays(arrays)  # rows of the same class merge exactly
    return merged if merged.dim is not None else FeatureStats(dim=stats.dim)

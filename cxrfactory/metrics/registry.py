"""The metric registry: every metric that reads the feature bank, selectable by name.

As StyleGAN2-ADA's ``metric_main``: one table of named metrics, each a small module of math,
each computed from the same rows (:mod:`cxrfactory.metrics.bank`) so a set is embedded once:

============================  ===============================================================
``fdd``                       FDD per class (exact float64 statistics, ``metrics/fdd.py``) and
                              its excess over the real-vs-real floor with a bootstrap interval
                              (``metrics/fdd_interval.py``)
``class_consistency``         the classifier's top-1 accuracy on each class's rows
``kid``                       Kernel Inception Distance, unbiased, over subsets (``metrics/kid.py``)
``prdc``                      precision, recall, density, coverage, k = 5 (``metrics/prdc.py``)
``memorization``              share of synthetic images closer to a training image than the
                              held-out rule allows (``metrics/memorization.py``; the full audit
                              with its outputs is ``jobs/audit.py``)
============================  ===============================================================

A metric gets :class:`EvaluationRows` and returns one value per class for every synthetic set,
plus an ``info`` record (its settings) for fdd.json.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrfactory.errors import UserError
from cxrfactory.metrics.bank import BankArrays
from cxrfactory.metrics.fdd_interval import excess_over_floor
from cxrfactory.metrics.fdd_pipeline import half_of
from cxrfactory.metrics.kid import kid
from cxrfactory.metrics.prdc import prdc

PRDC_K = 5


class MetricError(UserError, ValueError):
    """An unknown metric name, or rows a metric cannot measure."""


@dataclass
class EvaluationRows:
    """What every metric reads: the bank rows of one evaluation."""

    classes: tuple[str, ...]  # evaluated classes
    known: tuple[str, ...]  # the classifier's classes (class-consistency scores only these)
    real: BankArrays  # the real split compared against (its thumbnails with memorization)
    synthetic: dict[str, BankArrays]  # per synthetic set name
    train: BankArrays | None = None  # the real training split (memorization only)
    seed: int = 0  # bootstrap and subset draws
    bootstrap_reps: int = 100


@dataclass
class MetricResult:
    per_set: dict[str, dict[str, Any]]  # synthetic set name -> class -> value
    info: dict[str, Any] = field(default_factory=dict)  # settings, thresholds: recorded once


@dataclass(frozen=True)
class Metric:
    name: str
    summary: str
    needs_train: bool  # reads the real training split's bank (and thumbnails)
    compute: Callable[[EvaluationRows], MetricResult]


def _per_class(rows: EvaluationRows, measure: Callable[[BankArrays, BankArrays], Any]) -> dict[str, dict]:
    return {name: {c: measure(rows.real.of_class(c), syn.of_class(c)) for c in rows.classes}
            for name, syn in rows.synthetic.items()}


def _fdd(rows: EvaluationRows) -> MetricResult:
    def measure(real: BankArrays, fake: BankArrays) -> dict[str, Any]:
        first = half_of(real.patient_id)
        return excess_over_floor(real.feature, fake.feature, (real.feature[first], real.feature[~first]),
                                 reps=rows.bootstrap_reps, seed=rows.seed)

    return MetricResult(_per_class(rows, measure), {
        "excess": "FD(half a, synthetic) - FD(half a, half b) at equal sizes (the real split's "
                  "patient halves): 0 for a set as good as new real images; interval: estimate "
                  "± 1.96 bootstrap standard errors",
        "reps": rows.bootstrap_reps})


def consistency(rows: BankArrays, known: Sequence[str]) -> float | None:
    """Top-1 accuracy over the rows whose class the classifier knows (None: it knows none)."""
    scored = np.isin(rows.label, list(known))
    return float(np.mean(rows.predicted[scored] == rows.label[scored])) if scored.any() else None


def _class_consistency(rows: EvaluationRows) -> MetricResult:
    per_set = {name: {c: consistency(syn.of_class(c), rows.known) for c in rows.classes}
               for name, syn in rows.synthetic.items()}
    return MetricResult(per_set, {"real": {c: consistency(rows.real.of_class(c), rows.known)
                                           for c in rows.classes}})


def _kid(rows: EvaluationRows) -> MetricResult:
    def measure(real: BankArrays, fake: BankArrays) -> dict[str, Any] | None:
        if min(len(real), len(fake)) < 2:
            return None
        return kid(real.feature, fake.feature, seed=rows.seed)

    return MetricResult(_per_class(rows, measure), {"kernel": "(x·y/d + 1)^3, unbiased MMD², subsets"})


def _prdc(rows: EvaluationRows) -> MetricResult:
    def measure(real: BankArrays, fake: BankArrays) -> dict[str, float] | None:
        if min(len(real), len(fake)) <= PRDC_K:
            return None  # k-NN radii need more than k rows
        return prdc(real.feature, fake.feature, k=PRDC_K)

    return MetricResult(_per_class(rows, measure), {"k": PRDC_K})


def _memorization(rows: EvaluationRows) -> MetricResult:
    from cxrfactory.metrics.audit import AuditRule, audit

    if rows.train is None:
        raise MetricError("memorization needs the real training split's bank")
    per_set, info = {}, {}
    for name, syn in rows.synthetic.items():
        result = audit(rows.train, rows.real, [syn], AuditRule())
        per_set[name] = {c: result.per_class[c]["flag_rate"] if c in result.per_class else None
                         for c in rows.classes}
        info = {"rule": result.rule_record(), "thresholds": result.thresholds,
                "held_out_flag_rate": result.held_out_flag_rate,
                "reference": "thresholds from this evaluation's sample of the real split and its "
                             "classes (jobs/audit.py uses every held-out row, so its rates differ "
                             "slightly)"}
    return MetricResult(per_set, info)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("fdd", "FDD per class, and its excess over the real floor with a bootstrap interval", False, _fdd),
    Metric("class_consistency", "the classifier's top-1 accuracy on each class's rows", False,
           _class_consistency),
    Metric("kid", "Kernel Inception Distance (unbiased, subsets) with its spread", False, _kid),
    Metric("prdc", f"precision, recall, density, coverage (k = {PRDC_K})", False, _prdc),
    Metric("memorization", "share of near-copies of training images (the audit's rule)", True,
           _memorization),
)}
DEFAULT = ("fdd", "class_consistency", "kid", "prdc")


def select(names: Sequence[str]) -> tuple[str, ...]:
    """Validated metric names in registry order; FDD and class-consistency are always kept
    (they are the table every output shows)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"unknown metric {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    chosen = set(names) | {"fdd", "class_consistency"}
    return tuple(n for n in METRICS if n in chosen)


def compute(names: Sequence[str], rows: EvaluationRows) -> Mapping[str, MetricResult]:
    return {name: METRICS[name].compute(rows) for name in names}

"""Classification metrics in NumPy (no scikit-learn): per-class AUROC, accuracy, confusion.

AUROC uses the rank form of the Mann-Whitney U statistic: the probability that a random
positive scores above a random negative, ties counting one half. It equals the trapezoidal
area under the ROC curve exactly, and costs one sort.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["auroc", "classification_metrics", "jsonable"]


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney U) formula; tied scores share their
    mean rank. NaN when ``positives`` holds only one class (the area is undefined)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = np.asarray(positives, dtype=bool).ravel()
    n_pos = int(positives.sum())
    n_neg = positives.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based mid-ranks
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def classification_metrics(logits: np.ndarray, labels: np.ndarray, targets: np.ndarray,
                           classes: Sequence[str], mode: str) -> dict[str, Any]:
    """Per-class one-vs-rest AUROC, top-1 accuracy (overall and per class) and the confusion
    matrix (rows: true ``label``, columns: argmax). Multilabel AUROC scores each class against
    its finding; accuracy and confusion use the row's ``label`` in both modes. The macro AUROC
    averages the classes where it is defined (both positives and negatives present)."""
    if mode not in ("multiclass", "multilabel"):
        raise ValueError(f"mode must be 'multiclass' or 'multilabel', got {mode!r}")
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    k = len(classes)
    if mode == "multiclass":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = shifted / shifted.sum(axis=1, keepdims=True)
        positives = labels[:, None] == np.arange(k)[None, :]
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
        positives = np.asarray(targets) > 0.5
    per_class = {c: auroc(scores[:, i], positives[:, i]) for i, c in enumerate(classes)}
    defined = [v for v in per_class.values() if not math.isnan(v)]
    predicted = logits.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    rows = confusion.sum(axis=1)
    return {
        "macro_auroc": float(np.mean(defined)) if defined else math.nan,
        "accuracy": float((predicted == labels).mean()) if labels.size else math.nan,
        "auroc": per_class,
        "class_accuracy": {c: float(confusion[i, i] / rows[i]) if rows[i] else math.nan
                           for i, c in enumerate(classes)},
        "confusion": confusion.tolist(),
    }


def jsonable(value: Any) -> Any:
    """Metrics -> strict JSON values: NaN and infinities (an undefined AUROC) become null,
    tuples lists, at any depth of dicts and lists."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

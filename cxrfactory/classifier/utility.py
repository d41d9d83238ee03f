"""Downstream utility: does synthetic data make the classifier better?

Two arms with the same network, schedule and per-class cap: ``real`` trains on the real train
split alone, at most ``target_per_class`` rows of a class per epoch; ``real+synthetic`` fills
every class up to ``target_per_class`` rows per epoch with synthetic ones (real rows first). Both pick their checkpoint on the real
val split and are scored on the real test split, which neither saw: per-class one-vs-rest
AUROC, the macro average, and the difference. Rare classes (fewest real training rows) are
called out, since that is where balancing should help.

The result is ``utility.json`` in the schema :mod:`cxrfactory.classifier.utility_schema` reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cxrfactory.labels import multi_hot
from cxrfactory.metrics.classification import classification_metrics, jsonable
from cxrfactory import filenames
from cxrfactory.classifier.artifact import (
    load_classifier_artifact,
    read_classifier_config,
    read_classifier_files,
)
from cxrfactory.raydata import read_shards
from cxrfactory.classifier.config import ClassifierConfig, ClassifierError
from cxrfactory.classifier.driver import train_classifier
from cxrfactory.models.densenet import decode_images
from cxrfactory.storage import resolve
from cxrfactory.weights import ArtifactFiles

ARMS = ("real", "real+synthetic")


class TestScorer:
    """Ray Data stage: shard rows -> the classifier's logits, label index and multi-hot targets."""

    def __init__(self, artifact: ArtifactFiles) -> None:
        self.loaded = load_classifier_artifact(artifact)  # the files' bytes, read on the driver

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model, classes, prep = self.loaded.model, self.loaded.classes, self.loaded.preprocessing
        with torch.inference_mode():
            logits = model(decode_images(batch["image"], prep)).float().numpy()
        position = {c: i for i, c in enumerate(classes)}
        findings = [list(f) if f is not None else [] for f in batch["findings"]]
        return {"logits": logits,
                "label": np.array([position[str(c)] for c in batch["label"]], dtype=np.int64),
                "targets": multi_hot(findings, classes)}


def score_split(artifact: str, real: str, split: str, *, s3_endpoint: str | None = None,
                batch_size: int = 64) -> dict[str, Any]:
    """Per-class AUROC, accuracy and confusion of a classifier artifact (a folder or
    ``s3://`` prefix) on one real split."""
    files = read_classifier_files(artifact, s3_endpoint)
    loaded = load_classifier_artifact(files)
    ds, _ = read_shards(real, split=split, classes=list(loaded.classes), s3_endpoint=s3_endpoint,
                        columns=["image", "label", "findings"])
    rows = ds.map_batches(TestScorer, fn_constructor_kwargs={"artifact": files},
                          batch_size=batch_size, concurrency=1, num_cpus=1).take_all()
    if not rows:
        raise ClassifierError(f"{real} has no {split} rows for the classes {', '.join(loaded.classes)}")
    logits = np.stack([r["logits"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    targets = np.stack([r["targets"] for r in rows])
    mode = read_classifier_config(files).get("extra", {}).get("training", {}).get("mode", "multiclass")
    metrics = classification_metrics(logits, labels, targets, loaded.classes, mode)
    metrics["n_test"] = {c: int((labels == i).sum()) for i, c in enumerate(loaded.classes)}
    return metrics


def rare_classes(counts: dict[str, int], k: int = 3) -> list[str]:
    """The ``k`` classes with the fewest real training rows (ties by vocabulary order)."""
    return [c for c, _ in sorted(counts.items(), key=lambda kv: kv[1])[:k]]


def evaluate_utility(base: ClassifierConfig, synthetic: Sequence[str], target_per_class: int,
                     out: str, *, split: str = "test",
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train both arms, score both on the real ``split``; returns (and writes) utility.json."""
    if target_per_class < 1:
        raise ClassifierError(f"--target-per-class must be positive, got {target_per_class}")
    if not synthetic:
        raise ClassifierError("give at least one synthetic shard folder (--synthetic URI)")
    out_dir = resolve(out, base.s3_endpoint)
    arms = {
        # Both arms cap every class at the same rows per epoch; only the mixed arm can fill
        # the rare classes up to it, with synthetic rows: that is what balancing buys.
        "real": dataclasses.replace(base, out=out_dir.join("real").uri, synthetic=(),
                                    synthetic_ratio=None, balance_per_class=target_per_class,
                                    run_name="utility-real"),
        "real+synthetic": dataclasses.replace(base, out=out_dir.join("real+synthetic").uri,
                                              synthetic=tuple(synthetic), synthetic_ratio=None,
                                              balance_per_class=target_per_class,
                                              run_name="utility-mixed"),
    }
    result: dict[str, Any] = {"arms": {}, "config": {"base": base.to_dict(),
                                                      "synthetic": list(synthetic),
                                                      "target_per_class": target_per_class,
                                                      "split": split}}
    for name, config in arms.items():
        log(f"[utility] arm {name!r}: training")
        trained = train_classifier(config, log=log)
        scores = score_split(trained.artifact, config.real, split, s3_endpoint=config.s3_endpoint)
        result["arms"][name] = {
            "auroc": scores["auroc"], "macro_auroc": scores["macro_auroc"],
            "accuracy": scores["accuracy"], "class_accuracy": scores["class_accuracy"],
            "n_test": scores["n_test"], "artifact": trained.artifact,
            "n_train": {c: int(n) for c, n in
                        _artifact_extra(trained.artifact, config.s3_endpoint).get("rows_per_epoch", {}).items()},
        }
        log(f"[utility] arm {name!r}: test macro AUROC {scores['macro_auroc']:.3f}")
    real, mixed = result["arms"]["real"], result["arms"]["real+synthetic"]
    classes = list(real["auroc"])
    result["classes"] = classes
    result["delta"] = {c: _diff(mixed["auroc"].get(c), real["auroc"].get(c)) for c in classes}
    result["macro_delta"] = _diff(mixed["macro_auroc"], real["macro_auroc"])
    result["rare_classes"] = rare_classes({c: real["n_train"].get(c, 0) for c in classes})
    out_dir.join(filenames.UTILITY).write_text(json.dumps(jsonable(result), indent=2) + "\n")
    return result


def _artifact_extra(artifact: str, s3_endpoint: str | None) -> dict[str, Any]:
    """What the classifier's trainer recorded beside the weights (training config, rows)."""
    return read_classifier_config(artifact, s3_endpoint).get("extra", {})


def _diff(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return None
    return float(a - b)


def format_table(result: dict[str, Any]) -> str:
    """The terminal table: per class AUROC of both arms and the difference."""
    real, mixed = result["arms"]["real"], result["arms"]["real+synthetic"]
    lines = [f"{'class':<14} {'n_train':>8} {'real':>7} {'+synth':>7} {'delta':>7}"]
    for c in result["classes"]:
        cells = [real["auroc"].get(c), mixed["auroc"].get(c), result["delta"].get(c)]
        text = " ".join(f"{v:>7.3f}" if isinstance(v, float) and not math.isnan(v) else f"{'-':>7}"
                        for v in cells)
        rare = "  (rare)" if c in result["rare_classes"] else ""
        lines.append(f"{c:<14} {real['n_train'].get(c, 0):>8} {text}{rare}")
    md = result["macro_delta"]
    lines.append(f"{'macro':<14} {'':>8} {real['macro_auroc']:>7.3f} {mixed['macro_auroc']:>7.3f} "
                 + (f"{md:>7.3f}" if md is not None else f"{'-':>7}"))
    return "\n".join(lines)

"""The classifier artifact: a trained :class:`~cxrfactory.models.densenet.XrayDenseNet` with
its class names and preprocessing, so FDD always knows how its features were made.

Layout (docs/architecture.md, "Artifacts")::

    <dir>/classifier.pt   state dict, loaded with torch.load(weights_only=True)
    <dir>/config.json     network config, classes, preprocessing, extra
    <dir>/sha256          hex digest of classifier.pt (written last: the artifact is complete)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch

from cxrfactory import filenames
from cxrfactory.labels import validate_classes
from cxrfactory.models.densenet import (
    DenseNetConfig,
    Preprocessing,
    XrayDenseNet,
    load_weights_file,
)
from cxrfactory.storage import resolve

ARTIFACT_FORMAT = 1



class ClassifierArtifact(NamedTuple):
    model: XrayDenseNet  # in eval mode, on the CPU
    classes: tuple[str, ...]  # class of each logit, in order
    preprocessing: Preprocessing
    sha256: str  # hex digest of classifier.pt: identifies the features' provenance


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (see :mod:`cxrfactory.storage`)."""
    resolve(path).write_bytes(data)


def save_classifier_artifact(
    directory: str | os.PathLike[str],
    model: XrayDenseNet,
    classes: tuple[str, ...] | list[str],
    preprocessing: Preprocessing,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write ``classifier.pt``, ``config.json`` and ``sha256`` (last); return the sha256.

    ``classes`` name the logits in order (a subset of the vocabulary, in vocabulary order);
    ``extra`` (JSON-serialisable: training config, validation AUROC, ...) is kept in
    ``config.json``.
    """
    classes = tuple(classes)
    if validate_classes(classes) != classes:
        raise ValueError(f"classes must follow the vocabulary order, got {list(classes)}")
    if len(classes) != model.config.num_classes:
        raise ValueError(
            f"{len(classes)} class names for a model with {model.config.num_classes} outputs"
        )
    if not preprocessing.grayscale:
        raise ValueError("XrayDenseNet reads one channel: preprocessing.grayscale must be True")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, buffer)
    weights = buffer.getvalue()
    digest = hashlib.sha256(weights).hexdigest()
    config = {
        "format": ARTIFACT_FORMAT,
        "kind": "classifier",
        "model": {**asdict(model.config), "block_config": list(model.config.block_config)},
        "feature_dim": model.feature_dim,
        "classes": list(classes),
        "preprocessing": preprocessing.to_dict(),
        "extra": extra or {},
    }
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"extra must be JSON-serialisable: {error}") from None
    # A stale sha256 must not vouch for new weights while they are being replaced.
    (directory / filenames.SHA256).unlink(missing_ok=True)
    _write_atomic(directory / filenames.CLASSIFIER_WEIGHTS, weights)
    _write_atomic(directory / filenames.CONFIG, config_text.encode())
    _write_atomic(directory / filenames.SHA256, (digest + "\n").encode())
    return digest


def read_classifier_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The artifact's parsed ``config.json`` (model, classes, preprocessing, extra)."""
    path = Path(directory) / filenames.CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"classifier artifact lacks {filenames.CONFIG}: {path}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: corrupt JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    for key in ("model", "classes", "preprocessing"):
        if key not in config:
            raise ValueError(f"{path}: missing the {key!r} entry")
    return config


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_classifier_artifact(directory: str | os.PathLike[str]) -> ClassifierArtifact:
    """Load a classifier artifact, verifying its sha256; the model comes back in eval mode.

    Weights load with ``torch.load(weights_only=True)``: an artifact from a stranger cannot
    run code. Missing files raise FileNotFoundError, corrupt ones ValueError, each naming
    the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"classifier artifact directory not found: {directory}")
    weights_path, sha_path = directory / filenames.CLASSIFIER_WEIGHTS, directory / filenames.SHA256
    for path in (weights_path, sha_path):
        if not path.is_file():
            raise FileNotFoundError(f"classifier artifact lacks {path.name}: {path}")
    config = read_classifier_config(directory)
    expected = sha_path.read_text().strip()
    actual = _sha256_of(weights_path)
    if actual != expected:
        raise ValueError(
            f"{weights_path}: sha256 {actual} does not match {sha_path} ({expected or 'empty'}); "
            f"the file is corrupt or was replaced"
        )
    try:
        model_config = DenseNetConfig(**config["model"])
        preprocessing = Preprocessing.from_dict(config["preprocessing"])
        classes = tuple(str(name) for name in config["classes"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{directory / filenames.CONFIG}: {error}") from None
    if len(classes) != model_config.num_classes:
        raise ValueError(
            f"{directory / filenames.CONFIG}: {len(classes)} classes for "
            f"{model_config.num_classes} outputs"
        )
    model = XrayDenseNet(model_config)
    load_weights_file(model, weights_path)
    model.eval()
    return ClassifierArtifact(model, classes, preprocessing, actual)

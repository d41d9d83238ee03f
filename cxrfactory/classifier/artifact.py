"""The classifier artifact: a trained :class:`~cxrfactory.models.densenet.XrayDenseNet` with
its class names and preprocessing, so FDD always knows how its features were made.

Layout (docs/architecture.md, "Artifacts"), in a local folder or under an ``s3://`` prefix::

    <dir>/classifier.pt   state dict, loaded with torch.load(weights_only=True)
    <dir>/config.json     network config, classes, preprocessing, extra
    <dir>/sha256          hex digest of classifier.pt (written last: the artifact is complete)

Every read and write goes through :mod:`cxrfactory.storage`; actors receive the files as bytes
(:func:`read_classifier_files`, :class:`~cxrfactory.weights.ArtifactFiles`).
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict
from typing import Any, NamedTuple

import torch

from cxrfactory import filenames
from cxrfactory.labels import validate_classes
from cxrfactory.models.densenet import DenseNetConfig, Preprocessing, XrayDenseNet, load_state
from cxrfactory.storage import Location, resolve
from cxrfactory.weights import ArtifactError, ArtifactFiles, read_artifact_files, sha256_hex

ARTIFACT_FORMAT = 1
#: Where a good classifier artifact comes from.
MADE_BY = "jobs/train_classifier.py (<out>/classifier)"

Where = str | os.PathLike[str] | Location


class ClassifierArtifact(NamedTuple):
    model: XrayDenseNet  # in eval mode, on the CPU
    classes: tuple[str, ...]  # class of each logit, in order
    preprocessing: Preprocessing
    sha256: str  # hex digest of classifier.pt: identifies the features' provenance


def _location(directory: Where, s3_endpoint: str | None) -> Location:
    return directory if isinstance(directory, Location) else resolve(directory, s3_endpoint)


def save_classifier_artifact(
    directory: Where,
    model: XrayDenseNet,
    classes: tuple[str, ...] | list[str],
    preprocessing: Preprocessing,
    extra: dict[str, Any] | None = None,
    *,
    s3_endpoint: str | None = None,
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
    loc = _location(directory, s3_endpoint)
    buffer = io.BytesIO()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, buffer)
    weights = buffer.getvalue()
    digest = sha256_hex(weights)
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
    stale = loc.join(filenames.SHA256)
    if stale.exists():
        stale.fs.delete_file(stale.path)
    loc.join(filenames.CLASSIFIER_WEIGHTS).write_bytes(weights)
    loc.join(filenames.CONFIG).write_text(config_text)
    loc.join(filenames.SHA256).write_text(digest + "\n")
    return digest


def read_classifier_files(directory: Where, s3_endpoint: str | None = None) -> ArtifactFiles:
    """The artifact's files, read once through storage and verified (what actors receive)."""
    return read_artifact_files(_location(directory, s3_endpoint), filenames.CLASSIFIER_WEIGHTS,
                               kind="classifier", made_by=MADE_BY)


def read_classifier_config(directory: Where | ArtifactFiles,
                           s3_endpoint: str | None = None) -> dict[str, Any]:
    """The artifact's parsed ``config.json`` (model, classes, preprocessing, extra)."""
    if isinstance(directory, ArtifactFiles):
        files = directory
    else:
        loc = _location(directory, s3_endpoint).join(filenames.CONFIG)
        try:
            data = loc.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactError(f"classifier artifact lacks {filenames.CONFIG}: {loc.uri} "
                                f"(a good one is written by {MADE_BY})") from None
        files = ArtifactFiles(loc.uri.rsplit("/", 1)[0], filenames.CLASSIFIER_WEIGHTS,
                              {filenames.CONFIG: data}, MADE_BY)
    config = files.config()
    for key in ("model", "classes", "preprocessing"):
        if key not in config:
            raise ArtifactError(f"{files.where(filenames.CONFIG)}: missing the {key!r} entry")
    return config


def load_classifier_artifact(directory: Where | ArtifactFiles,
                             s3_endpoint: str | None = None) -> ClassifierArtifact:
    """Load a classifier artifact (a folder, or its files already read), verifying its sha256;
    the model comes back in eval mode.

    Weights load with ``torch.load(weights_only=True)``: an artifact from a stranger cannot
    run code. Every problem is an :class:`~cxrfactory.weights.ArtifactError` (or a
    ``WeightsError``) naming the file.
    """
    files = (directory if isinstance(directory, ArtifactFiles)
             else read_classifier_files(directory, s3_endpoint))
    config = read_classifier_config(files)
    where = files.where(filenames.CONFIG)
    try:
        model_config = DenseNetConfig(**config["model"])
        preprocessing = Preprocessing.from_dict(config["preprocessing"])
        classes = tuple(str(name) for name in config["classes"])
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"{where}: {error}") from None
    if len(classes) != model_config.num_classes:
        raise ArtifactError(f"{where}: {len(classes)} classes for {model_config.num_classes} outputs")
    model = XrayDenseNet(model_config)
    load_state(model, files.state_dict(), files.where(filenames.CLASSIFIER_WEIGHTS))
    model.eval()
    return ClassifierArtifact(model, classes, preprocessing, files.sha256)

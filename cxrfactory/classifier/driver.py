"""Train the DenseNet classifier on Ray Train and export the best checkpoint as its artifact.

The classifier is what FDD measures with (its features) and what class-consistency asks (its
predictions), so it is trained here with the same preprocessing FDD will apply::

    plan the mix (classifier.data, no Ray)  ->  Ray Data: draw per class, shuffle, decode
      ->  TorchTrainer workers (classifier.worker, DDP): train, validate every epoch
      ->  Ray keeps the best checkpoint by validation macro AUROC
      ->  <out>/classifier: the classifier artifact (classifier.artifact), with its preprocessing
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cxrfactory import filenames
from cxrfactory import shards
from cxrfactory.checkpoints import read_checkpoint
from cxrfactory.classifier.artifact import save_classifier_artifact
from cxrfactory.classifier.config import (
    NETWORK_SIZES,
    SCORE_METRIC,
    ClassifierConfig,
    ClassifierError,
    ClassifierTrainingError,
)
from cxrfactory.classifier.data import TrainingMix, build_datasets, expected_positives, plan_mix
from cxrfactory.classifier.worker import (
    MADE_BY,
    inverse_frequency_weights,
    read_history,
    train_loop_per_worker,
)
from cxrfactory.errors import find_user_error
from cxrfactory.metrics.classification import jsonable
from cxrfactory.models.densenet import densenet121_xray
from cxrfactory.storage import Location, check_readable, check_writable, resolve



@dataclass(frozen=True)
class TrainedClassifier:
    """What a finished run leaves: the artifact and the epoch it was taken from."""

    artifact: str  # the classifier artifact folder or s3:// prefix (FDD's --classifier)
    sha256: str  # of its weights
    epoch: int  # the epoch of the best checkpoint
    metrics: dict[str, Any]  # that epoch's training and validation metrics
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch (metrics.jsonl)


def _manifest(uri: str, s3_endpoint: str | None) -> shards.Manifest:
    root = resolve(uri, s3_endpoint)
    check_readable(root, "shard folder")
    return shards.read_manifest(root)


def _check_resumable(run: Location, config: ClassifierConfig) -> None:
    """A run name already used with other settings would resume the wrong network."""
    saved = run.join(filenames.CLASSIFIER_RUN)
    current = {k: v for k, v in config.to_dict().items() if k not in ("epochs", "out", "max_failures")}
    if saved.exists():
        previous = json.loads(saved.read_text())
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise ClassifierError(
                f"run {config.run_name!r} in {run.uri} was started with other settings "
                f"({', '.join(changed)}); give another --run-name to start afresh")
    saved.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def _root_cause(error: BaseException) -> str:
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank, cause = sorted(failures.items())[0]
        return f"worker {rank}: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
    return str(error).strip().splitlines()[-1]


def _best(result: Any) -> tuple[Any, dict[str, Any]]:
    """The kept checkpoint with the highest validation score; on a tie the later epoch, as Ray
    orders them (it has already deleted the earlier one)."""
    kept = list(result.best_checkpoints or [])
    if not kept:
        raise ClassifierTrainingError("training reported no checkpoint")

    def key(item: tuple[Any, dict[str, Any]]) -> tuple[float, int]:
        score = item[1].get(SCORE_METRIC)
        return (-math.inf if score is None or math.isnan(score) else score), item[1]["epoch"]

    return max(kept, key=key)


def train_classifier(config: ClassifierConfig,
                     log: Callable[[str], None] = print) -> TrainedClassifier:
    """Train on Ray Train and export the best checkpoint as ``<out>/classifier``."""
    import ray

    from cxrfactory.runtime import init_ray

    # Plan (before Ray starts: a bad input or output fails in a second, not after start-up)
    real = _manifest(config.real, config.s3_endpoint)
    mix = plan_mix(config, real, [_manifest(u, config.s3_endpoint) for u in config.synthetic])
    for note in mix.notes:
        log(f"[classifier] note: {note}")
    log(f"[classifier] rows per epoch ({config.mode}, {config.arch} at {config.resolution} px):\n"
        + mix.describe())
    out = resolve(config.out, config.s3_endpoint)
    check_writable(out)
    init_ray()
    if config.use_gpu and not ray.cluster_resources().get("GPU"):
        raise ClassifierError("--use-gpu asks for GPUs but the Ray cluster has none")
    weights = _class_weights(config, mix, log)
    storage = resolve(config.storage or out.join("runs").uri, config.s3_endpoint)
    run = storage.join(config.run_name)
    _check_resumable(run, config)
    metrics_uri = run.join(filenames.METRICS).uri

    # Train
    result = _fit(config, mix, storage, metrics_uri, weights)

    # Export the best checkpoint with its preprocessing
    return _export(config, mix, result, out, metrics_uri, log)


def _class_weights(config: ClassifierConfig, mix: TrainingMix,
                   log: Callable[[str], None]) -> list[float] | None:
    if not config.class_weighted:
        return None
    counts = mix.class_counts() if config.mode == "multiclass" else expected_positives(config, mix)
    weights = inverse_frequency_weights(counts, config.mode, sum(mix.class_counts()))
    log("[classifier] class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(mix.classes, weights)))
    return weights


def _fit(config: ClassifierConfig, mix: TrainingMix, storage: Location, metrics_uri: str,
         weights: list[float] | None) -> Any:
    """Ray Train's result; a user error inside a worker comes back as itself."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cxrfactory.raydata import quiet_datasets, train_worker_resources

    with quiet_datasets():
        train_ds, val_ds = build_datasets(config, mix)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "classes": list(mix.classes),
                           "class_weights": weights, "metrics_uri": metrics_uri},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=train_worker_resources(
                                         num_workers=config.num_workers, use_gpu=config.use_gpu,
                                         cpus_per_worker=config.cpus_per_worker)),
        run_config=RunConfig(
            name=config.run_name, storage_path=storage.path, storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE_METRIC,
                                               checkpoint_score_order="max"),
            logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": train_ds, "val": val_ds},
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        if (user_error := find_user_error(error)) is not None:
            raise user_error from error  # e.g. a full disk in a worker: one line, exit status 2
        raise ClassifierTrainingError(f"training failed after {config.max_failures} recovery "
                                      f"attempt(s): {_root_cause(error)}") from error


def _export(config: ClassifierConfig, mix: TrainingMix, result: Any, out: Location,
            metrics_uri: str, log: Callable[[str], None]) -> TrainedClassifier:
    """The best kept checkpoint as the classifier artifact, and metrics.jsonl beside it."""
    checkpoint, metrics = _best(result)
    with checkpoint.as_directory() as directory:
        state, _ = read_checkpoint(directory, made_by=MADE_BY)
    model = densenet121_xray(num_classes=len(mix.classes), **NETWORK_SIZES[config.arch])
    model.load_state_dict(state["model"])
    history = read_history(metrics_uri, config.s3_endpoint)
    out.join(filenames.METRICS).write_text("".join(json.dumps(h) + "\n" for h in history))
    best = jsonable(dict(metrics))
    artifact = out.join(filenames.CLASSIFIER)
    sha = save_classifier_artifact(
        artifact, model, mix.classes, config.preprocessing,
        extra={"training": config.to_dict(), "epoch": int(state["epoch"]), "validation": best,
               "rows_per_epoch": dict(zip(mix.classes, mix.class_counts()))})
    log(f"[classifier] best epoch {int(state['epoch'])}: val macro AUROC "
        f"{best.get(SCORE_METRIC)}, accuracy {best.get('val_accuracy')}; artifact {artifact} "
        f"(sha256 {sha[:12]})")
    return TrainedClassifier(artifact.uri, sha, int(state["epoch"]), best, history)

"""DenseNet classifier on Ray Train: real shards, optionally mixed with synthetic ones.

The classifier is what FDD measures with (its features) and what class-consistency asks (its
predictions), so it is trained here with the same preprocessing FDD will apply::

    plan the mix (driver)  ->  Ray Data: draw per class, shuffle, decode + preprocess
      ->  TorchTrainer workers (DDP): train, validate every epoch (AUROC, accuracy, confusion)
      ->  Ray keeps the best checkpoint by validation macro AUROC
      ->  <out>/classifier: the classifier artifact (DESIGN "Artifacts"), with its preprocessing

Synthetic mixing: ``synthetic_ratio`` r makes synthetic rows a fraction r of every epoch
(``r / (1 - r)`` synthetic rows per real row, per class, so the class mix stays the real one);
``balance_per_class`` T gives every class T rows per epoch, real rows first and synthetic ones
filling the gap (the "real + synthetic balanced to a target" utility experiment; without
synthetic roots it only caps the real rows, e.g. NIH's 60 % Normal); with neither, every
synthetic row is used as given. A class drawn partly keeps a fixed subset,
chosen by a hash of ``image_id`` under the run's seed, so counts are exact and a rerun trains
on the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrfactory import shards
from cxrfactory.labels import class_index, multi_hot, validate_classes
from cxrfactory.models.densenet import (
    Preprocessing,
    XrayDenseNet,
    densenet121_xray,
    preprocess,
    save_classifier_artifact,
)
from cxrfactory.storage import Location, check_readable, resolve

#: Network sizes: DenseNet-121 itself, and smaller siblings for CPU demos and tests.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "densenet121": {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64},
    "small": {"growth_rate": 16, "block_config": (3, 6, 9, 6), "num_init_features": 32},
    "tiny": {"growth_rate": 8, "block_config": (2, 2, 2, 2), "num_init_features": 16},
}
MODES = ("multiclass", "multilabel")
#: The validation metric that picks the checkpoint Ray Train keeps.
SCORE_METRIC = "val_macro_auroc"
ARTIFACT_DIR = "classifier"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "classifier_run.json"
STATE_FILE = "state.pt"
#: Rows per Ray Data decode task: amortises task overhead, still streams.
DECODE_BATCH_ROWS = 64


class ClassifierError(ValueError):
    """Input that cannot train a classifier (missing split, empty class, bad mix, ...)."""


class ClassifierTrainingError(RuntimeError):
    """Training itself failed (a worker error that recovery could not get past)."""


@dataclass(frozen=True)
class ClassifierConfig:
    """One classifier training run; saved in every checkpoint and in the artifact."""

    real: str  # real shard root (path or s3://): its train split trains, its val split picks the checkpoint
    out: str  # local folder: classifier/ (the artifact), metrics.jsonl, runs/ (Ray Train's storage)
    classes: tuple[str, ...] | None = None  # classes to learn, vocabulary order; None: the real manifest's
    mode: str = "multiclass"  # multiclass: softmax CE on `label`; multilabel: per-class sigmoid BCE on `findings`
    arch: str = "densenet121"  # a key of ARCHITECTURES
    resolution: int = 256  # preprocessing side in px: the paper's image size, so 256-px shards are not resampled
    weights: str | None = None  # local state dict to start from (ours, or torchvision's ImageNet file); None: random init
    synthetic: tuple[str, ...] = ()  # synthetic shard roots mixed into training
    synthetic_ratio: float | None = None  # synthetic fraction of each epoch's rows, in [0, 1); None: see balance_per_class
    balance_per_class: int | None = None  # at most this many rows per class per epoch, real first, synthetic fill the gap (without synthetic: a cap on real rows)
    class_weighted: bool = False  # inverse-frequency weights: CE class weights, BCE pos_weight
    augment: bool = True  # light random affine + brightness/contrast on training batches (never validation)
    epochs: int = 10  # passes over the training mix
    batch_size: int = 32  # global batch (all workers together)
    lr: float = 1e-3  # AdamW learning rate, cosine-annealed to 0 over the epochs
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    max_steps_per_epoch: int | None = None  # cut every epoch after this many steps (smoke runs); None: full passes
    num_workers: int = 1  # Ray Train workers (DDP replicas)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float | None = None  # Ray CPUs per worker; None: 1, or less so Ray Data keeps a CPU
    torch_threads: int | None = None  # torch intra-op threads per worker; None: Ray's default (its CPUs)
    seed: int = 0  # weights, augmentation and every epoch's draw and shuffle
    storage: str | None = None  # Ray Train storage (path or s3://); None: <out>/runs
    run_name: str = "classifier"  # the run's folder in storage; the same name resumes it
    max_failures: int = 2  # worker failures recovered from the last checkpoint
    s3_endpoint: str | None = None  # S3-compatible endpoint for s3:// locations

    def __post_init__(self) -> None:
        object.__setattr__(self, "synthetic", tuple(self.synthetic))
        if self.classes is not None:
            object.__setattr__(self, "classes", validate_classes(self.classes))
        if self.mode not in MODES:
            raise ClassifierError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.arch not in ARCHITECTURES:
            raise ClassifierError(f"arch must be one of {tuple(ARCHITECTURES)}, got {self.arch!r}")
        for name in ("epochs", "batch_size", "num_workers", "resolution"):
            if getattr(self, name) < 1:
                raise ClassifierError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution < 32:
            raise ClassifierError(f"resolution must be >= 32 px (DenseNet downsamples 32x), got {self.resolution}")
        if self.batch_size % self.num_workers:
            raise ClassifierError(f"batch_size {self.batch_size} must be divisible by num_workers {self.num_workers}")
        if self.synthetic_ratio is not None and not 0 <= self.synthetic_ratio < 1:
            raise ClassifierError(f"synthetic_ratio must be in [0, 1), got {self.synthetic_ratio}")
        if self.synthetic_ratio is not None and self.balance_per_class is not None:
            raise ClassifierError("give synthetic_ratio or balance_per_class, not both")
        if self.synthetic_ratio is not None and not self.synthetic:
            raise ClassifierError("synthetic_ratio needs synthetic shard roots")
        if self.balance_per_class is not None and self.balance_per_class < 1:
            raise ClassifierError(f"balance_per_class must be >= 1, got {self.balance_per_class}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ClassifierError("max_steps_per_epoch must be >= 1 or None")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_failures < 0:
            raise ClassifierError("lr must be > 0, weight_decay and max_failures >= 0")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ClassifierError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(resolution=self.resolution)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ClassifierError(f"unknown classifier config key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


#: Starting points for the job's --preset; flags override single fields.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},  # DenseNet-121 at 256 px: the FDD classifier for real data, on GPUs
    # 64-px phantoms, one worker on a 2-core CPU. Balanced, 540 train images: 10 epochs in
    # ~2.5 min, val accuracy 0.83 (9 classes). NIH prevalence, 3000 images, with
    # --balance-per-class 200 (817 rows per epoch): val accuracy 0.99, macro AUROC 1.00
    "demo": {"arch": "small", "resolution": 64, "epochs": 10, "batch_size": 32, "lr": 2e-3,
             "class_weighted": True, "torch_threads": 2},
    "smoke": {"arch": "tiny", "resolution": 32, "epochs": 1, "batch_size": 8,
              "max_steps_per_epoch": 2},
}


def build_model(config: ClassifierConfig, num_classes: int) -> XrayDenseNet:
    return densenet121_xray(num_classes=num_classes, weights_path=config.weights,
                            **ARCHITECTURES[config.arch])


# --------------------------------------------------------------------------------------------
# Decoding (shared with FDD, so features are made exactly as in training)


def decode_images(png_column: Sequence[Any], preprocessing: Preprocessing) -> torch.Tensor:
    """The ``image`` column (``{"bytes", "path"}`` structs or raw bytes) -> float32 (N, 1, R, R).

    Images of one size are preprocessed as one batch; mixed sizes (real 256 px next to a 64-px
    synthetic set) one by one, since each is resized to the same side anyway.
    """
    pixels = [shards.decode_png(item["bytes"] if isinstance(item, dict) else item)
              for item in png_column]
    if not pixels:
        side = preprocessing.resolution
        return torch.zeros((0, 1, side, side))
    if len({p.shape for p in pixels}) == 1:
        return preprocess(np.stack(pixels), preprocessing)
    return torch.cat([preprocess(p[None], preprocessing) for p in pixels])


@dataclass(frozen=True)
class TrainingDecoder:
    """Ray Data stage: shard rows -> ``x`` (N, 1, R, R), ``label`` index, ``targets`` multi-hot."""

    classes: tuple[str, ...]
    preprocessing: Preprocessing

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        findings = [list(f) if f is not None else [] for f in batch["findings"]]
        return {
            "x": decode_images(batch["image"], self.preprocessing).numpy(),
            "label": np.array([class_index(str(c), self.classes) for c in batch["label"]],
                              dtype=np.int64),
            "targets": multi_hot(findings, self.classes),
        }


# --------------------------------------------------------------------------------------------
# The training mix (driver side, no Ray)


@dataclass(frozen=True)
class Source:
    """One shard root's contribution to every epoch."""

    uri: str
    split: str  # "train" (the real root) or "synthetic"
    available: dict[str, int]  # rows per class in that split
    per_epoch: dict[str, int]  # rows per class in every epoch (<= available; a fixed subset)


@dataclass(frozen=True)
class TrainingMix:
    """What every epoch is made of, fixed before training starts."""

    classes: tuple[str, ...]  # the classifier's outputs, vocabulary order
    sources: tuple[Source, ...]  # the real train split first, then each synthetic root
    val: dict[str, int]  # real validation rows per class
    notes: tuple[str, ...] = ()  # where a wish could not be met (too few synthetic rows)

    def class_counts(self) -> list[int]:
        """Rows per class per epoch, all sources together."""
        return [sum(s.per_epoch[c] for s in self.sources) for c in self.classes]

    def describe(self) -> str:
        lines = [f"{'class':<14}{'real':>8}{'synthetic':>11}{'val':>7}"]
        for c in self.classes:
            syn = sum(s.per_epoch[c] for s in self.sources[1:])
            lines.append(f"{c:<14}{self.sources[0].per_epoch[c]:>8}{syn:>11}{self.val[c]:>7}")
        return "\n".join(lines)


def _proportional(n: int, caps: Sequence[int]) -> list[int]:
    """Split ``n <= sum(caps)`` into integer parts proportional to ``caps`` (largest remainder)."""
    total = sum(caps)
    if n <= 0 or total == 0:
        return [0] * len(caps)
    exact = [n * cap / total for cap in caps]
    parts = [math.floor(x) for x in exact]
    for i in sorted(range(len(caps)), key=lambda i: parts[i] - exact[i])[: n - sum(parts)]:
        parts[i] += 1
    return parts


def plan_mix(config: ClassifierConfig, real: shards.Manifest,
             synthetic: Sequence[shards.Manifest] = ()) -> TrainingMix:
    """Fix every epoch's rows per class and source; raise :class:`ClassifierError` for data
    that cannot train ``config`` (no train split, a class without rows, a val split that
    cannot score AUROC)."""
    classes = config.classes or validate_classes(real.classes)
    missing = [c for c in classes if c not in real.classes]
    if missing:
        raise ClassifierError(f"{config.real} has no class {', '.join(missing)} "
                              f"(it holds {', '.join(real.classes)})")
    if "train" not in real.counts:
        raise ClassifierError(f"{config.real} has no 'train' split (it holds "
                              f"{', '.join(real.counts) or 'none'}); is it a real shard folder?")
    real_avail = {c: int(real.counts["train"].get(c, 0)) for c in classes}
    val = {c: int(real.counts.get("val", {}).get(c, 0)) for c in classes}
    if sum(n > 0 for n in val.values()) < 2:
        raise ClassifierError(f"{config.real}'s val split has rows of {sum(n > 0 for n in val.values())} "
                              "class(es); choosing the best checkpoint by AUROC needs at least two")
    syn_avail = [{c: int(m.counts.get(shards.SYNTHETIC_SPLIT, {}).get(c, 0)) for c in classes}
                 for m in synthetic]
    real_take = dict(real_avail)
    if config.balance_per_class is not None:
        real_take = {c: min(n, config.balance_per_class) for c, n in real_avail.items()}
        wanted = {c: config.balance_per_class - real_take[c] for c in classes}
    elif config.synthetic_ratio is not None:
        r = config.synthetic_ratio
        wanted = {c: round(r / (1 - r) * real_avail[c]) for c in classes}
    else:
        wanted = {c: sum(a[c] for a in syn_avail) for c in classes}
    notes, syn_take = [], [dict.fromkeys(classes, 0) for _ in synthetic]
    for c in classes:
        have = [a[c] for a in syn_avail]
        if wanted[c] > sum(have) and synthetic:
            notes.append(f"{c}: {wanted[c]} synthetic rows per epoch wanted, {sum(have)} exist; "
                         "using all of them")
        for take, part in zip(syn_take, _proportional(min(wanted[c], sum(have)), have)):
            take[c] = part
    sources = [Source(config.real, "train", real_avail, real_take)]
    sources += [Source(uri, shards.SYNTHETIC_SPLIT, avail, take)
                for uri, avail, take in zip(config.synthetic, syn_avail, syn_take)]
    mix = TrainingMix(tuple(classes), tuple(sources), val, tuple(notes))
    empty = [c for c, n in zip(classes, mix.class_counts()) if n == 0]
    if empty:
        raise ClassifierError(f"class {', '.join(empty)} has no training rows (real or synthetic); "
                              "add images or leave it out with --classes")
    rows_per_worker = sum(mix.class_counts()) // config.num_workers
    if rows_per_worker < config.batch_size // config.num_workers:
        raise ClassifierError(f"{sum(mix.class_counts())} training rows give each of "
                              f"{config.num_workers} worker(s) less than one batch of "
                              f"{config.batch_size // config.num_workers}; lower --batch-size")
    return mix


# --------------------------------------------------------------------------------------------
# Ray Data


COLUMNS = ("image", "label", "findings", "split")


def build_datasets(config: ClassifierConfig, mix: TrainingMix):
    """``(train, val)`` Ray datasets of decoded, preprocessed rows.

    A class drawn partly keeps a fixed subset: the rows whose ``image_id`` hashes lowest under
    the run's seed (exact counts; one pass over the ids instead of a shuffle per class, which
    Ray Data runs poorly by the dozen). ``train`` is shuffled anew at every execution (every
    epoch), reproducibly from ``config.seed``.
    """
    from ray.data import RandomSeedConfig

    from cxrfactory.raydata import keep_sampled, read_shards, sample_thresholds

    salt = f"cxrfactory-classifier-{config.seed}"
    parts = []
    for source in mix.sources:
        drawn = [c for c in mix.classes if source.per_epoch[c]]
        if not drawn:
            continue
        ds, _ = read_shards(source.uri, split=source.split, classes=drawn,
                            columns=("image_id", *COLUMNS), s3_endpoint=config.s3_endpoint)
        thresholds = sample_thresholds(source.uri, split=source.split, available=source.available,
                                       wanted=source.per_epoch, salt=salt,
                                       s3_endpoint=config.s3_endpoint)
        if thresholds:
            ds = ds.map_batches(keep_sampled, fn_kwargs={"thresholds": thresholds, "salt": salt},
                                batch_format="pyarrow")
        parts.append(ds.select_columns(["image", "label", "findings"]))
    decoder = TrainingDecoder(mix.classes, config.preprocessing)
    train = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    train = train.random_shuffle(seed=RandomSeedConfig(seed=config.seed, reseed_after_execution=True))
    val, _ = read_shards(config.real, split="val", classes=[c for c in mix.classes if mix.val[c]],
                         columns=COLUMNS, s3_endpoint=config.s3_endpoint)
    val = val.select_columns(["image", "label", "findings"])
    return (train.map_batches(decoder, batch_size=DECODE_BATCH_ROWS),
            val.map_batches(decoder, batch_size=DECODE_BATCH_ROWS))


def expected_positives(config: ClassifierConfig, mix: TrainingMix) -> list[float]:
    """Multilabel: expected positives per class per epoch, from every row's ``findings`` (a
    pass over the label columns only) scaled by each class's draw fraction."""
    from cxrfactory.raydata import read_shards

    total = np.zeros(len(mix.classes))
    for source in mix.sources:
        drawn = [c for c in mix.classes if source.per_epoch[c]]
        if not drawn:
            continue
        ds, _ = read_shards(source.uri, split=source.split, classes=drawn,
                            columns=("label", "findings", "split"), s3_endpoint=config.s3_endpoint)
        for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
            hot = multi_hot([list(f) if f is not None else [] for f in batch["findings"]], mix.classes)
            scale = np.array([source.per_epoch[c] / source.available[c] for c in batch["label"]])
            total += (hot * scale[:, None]).sum(axis=0)
    return total.tolist()


# --------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class TrainedClassifier:
    """What a finished run leaves: the artifact and the epoch it was taken from."""

    artifact: str  # the classifier artifact folder (FDD's --classifier)
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
    saved = run.join(RUN_CONFIG_FILE)
    current = {k: v for k, v in config.to_dict().items() if k not in ("epochs", "out", "max_failures")}
    if saved.exists():
        previous = json.loads(saved.read_text())
        changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
        if changed:
            raise ClassifierError(
                f"run {config.run_name!r} in {run.uri} was started with other settings "
                f"({', '.join(changed)}); give another --run-name to start afresh")
    saved.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def _worker_resources(config: ClassifierConfig) -> dict[str, float]:
    """CPUs per worker: 1, or a fraction on a small cluster, so Ray Data keeps one CPU for
    reading and decoding (training workers' CPUs come out of Data's budget)."""
    import ray

    cpus = config.cpus_per_worker
    if cpus is None:
        total = ray.cluster_resources().get("CPU", 1.0)
        cpus = 1.0 if config.use_gpu else min(1.0, max(total - 1.0, 0.25) / config.num_workers)
    return {"CPU": cpus, **({"GPU": 1.0} if config.use_gpu else {})}


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
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cxrfactory.raydata import quiet_datasets
    from cxrfactory.runtime import init_ray
    from cxrfactory.training.classifier_loop import (
        inverse_frequency_weights,
        jsonable,
        read_history,
        train_loop_per_worker,
    )

    # Plan
    real = _manifest(config.real, config.s3_endpoint)
    mix = plan_mix(config, real, [_manifest(u, config.s3_endpoint) for u in config.synthetic])
    for note in mix.notes:
        log(f"[classifier] note: {note}")
    log(f"[classifier] rows per epoch ({config.mode}, {config.arch} at {config.resolution} px):\n"
        + mix.describe())
    init_ray()
    if config.use_gpu and not ray.cluster_resources().get("GPU"):
        raise ClassifierError("--use-gpu asks for GPUs but the Ray cluster has none")
    weights = None
    if config.class_weighted:
        counts = mix.class_counts() if config.mode == "multiclass" else expected_positives(config, mix)
        weights = inverse_frequency_weights(counts, config.mode, sum(mix.class_counts()))
        log("[classifier] class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(mix.classes, weights)))
    out = Path(config.out).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    storage = resolve(config.storage or str(out / "runs"), config.s3_endpoint)
    run = storage.join(config.run_name)
    _check_resumable(run, config)
    metrics_uri = run.join(METRICS_FILE).uri

    # Train
    with quiet_datasets():
        train_ds, val_ds = build_datasets(config, mix)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "classes": list(mix.classes),
                           "class_weights": weights, "metrics_uri": metrics_uri},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=_worker_resources(config)),
        run_config=RunConfig(
            name=config.run_name, storage_path=storage.path, storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=SCORE_METRIC,
                                               checkpoint_score_order="max"),
            logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": train_ds, "val": val_ds},
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise ClassifierTrainingError(f"training failed after {config.max_failures} recovery "
                                      f"attempt(s): {_root_cause(error)}") from error

    # Export the best checkpoint with its preprocessing
    checkpoint, metrics = _best(result)
    with checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
    model = densenet121_xray(num_classes=len(mix.classes), **ARCHITECTURES[config.arch])
    model.load_state_dict(state["model"])
    history = read_history(metrics_uri, config.s3_endpoint)
    (out / METRICS_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
    best = jsonable(dict(metrics))
    artifact = out / ARTIFACT_DIR
    sha = save_classifier_artifact(
        artifact, model, mix.classes, config.preprocessing,
        extra={"training": config.to_dict(), "epoch": int(state["epoch"]), "validation": best,
               "rows_per_epoch": dict(zip(mix.classes, mix.class_counts()))})
    log(f"[classifier] best epoch {int(state['epoch'])}: val macro AUROC "
        f"{best.get(SCORE_METRIC)}, accuracy {best.get('val_accuracy')}; artifact {artifact} "
        f"(sha256 {sha[:12]})")
    return TrainedClassifier(str(artifact), sha, int(state["epoch"]), best, history)

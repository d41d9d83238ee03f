"""FDD's Ray Data pipeline: sampled, keyed rows -> feature actors -> merged per-class statistics.

    read_shards ─▶ select_rows (exact N per class, by a hash of image_id; patient halves) ─▶
    FeatureExtractor actors (decode PNG, the classifier's own preprocessing, features + logits;
    per-class partial FeatureStats of each batch) ─▶ driver: exact merge per side

Only O(d²) statistics per class per batch leave the actors, never the features.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from cxrfactory.errors import UserError
from cxrfactory.classifier.artifact import load_classifier_artifact
from cxrfactory.metrics.stats import FeatureStats
from cxrfactory.raydata import keep_sampled, stable_fraction
from cxrfactory.weights import ArtifactFiles


SAMPLE_SALT = "cxrfactory-fdd-sample"  # which rows a per-class cap keeps
HALF_SALT = "cxrfactory-fdd-half"  # which patients form each half of the floor
HALVES = ("a", "b")


class FDDError(UserError, ValueError):
    """Input FDD cannot measure: a class without rows, a stale cache, a broken classifier."""


def select_rows(batch: pa.Table, *, side: int, thresholds: Mapping[str, float],
                halves: bool) -> pa.Table:
    """Ray Data stage (pyarrow batches): keep the sampled rows (:func:`keep_sampled`) and key
    each as ``<side>:<class>[/<half>]``, the half drawn by a hash of the patient."""
    batch = keep_sampled(batch, thresholds=thresholds, salt=SAMPLE_SALT)
    keys = [f"{side}:{c}" for c in batch.column("label").to_pylist()]
    if halves:
        first = stable_fraction(batch.column("patient_id").to_pylist(), HALF_SALT) < 0.5
        keys = [f"{k}/{HALVES[0] if h else HALVES[1]}" for k, h in zip(keys, first)]
    return batch.select(["image", "label"]).append_column("key", pa.array(keys, type=pa.string()))


class FeatureExtractor:
    """Ray Data actor: keyed rows -> one row of partial statistics per key of a batch.

    The artifact travels as its files' bytes, read once on the driver
    (:func:`~cxrfactory.classifier.artifact.read_classifier_files`: no shared filesystem
    needed), and is verified again on load.
    ``correct``/``scored`` count top-1 hits of the row's class among the rows whose class the
    classifier knows (class-consistency).
    """

    def __init__(self, artifact: ArtifactFiles, *, inference_batch: int,
                 threads: int | None) -> None:
        from cxrfactory.models.densenet import decode_images

        artifact = load_classifier_artifact(artifact)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.model = artifact.model.to(self.device)
        self.preprocessing = artifact.preprocessing
        self.position = {c: i for i, c in enumerate(artifact.classes)}
        self.inference_batch = inference_batch
        self.decode = decode_images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels, keys = [str(c) for c in batch["label"]], [str(k) for k in batch["key"]]
        stats = FeatureStats(dim=self.model.feature_dim)
        correct, scored = Counter(), Counter()
        for start in range(0, len(keys), self.inference_batch):
            chunk = slice(start, start + self.inference_batch)
            x = self.decode(batch["image"][chunk], self.preprocessing).to(self.device)
            with torch.inference_mode():
                features = self.model.features(x)  # (B, d)
                predicted = self.model.classifier(features).argmax(dim=1).cpu().numpy()
            stats.update(features.double().cpu().numpy(), keys[chunk])
            for key, label, guess in zip(keys[chunk], labels[chunk], predicted):
                if label in self.position:
                    scored[key] += 1
                    correct[key] += int(guess == self.position[label])
        out = stats.to_arrays()
        out["correct"] = np.array([correct[k] for k in out["label"]], dtype=np.int64)
        out["scored"] = np.array([scored[k] for k in out["label"]], dtype=np.int64)
        return out


@dataclass
class SideStats:
    """Merged statistics of one shard root, keyed by class (or ``class/half``)."""

    stats: FeatureStats
    correct: dict[str, int]
    scored: dict[str, int]

    def by_class(self, half: str | None = None) -> FeatureStats:
        """Statistics per class: the halves merged (exactly), or one half only."""
        return _relabel(self.stats, lambda key: _class_of(key, half))

    def accuracy(self, label: str) -> float | None:
        """Top-1 accuracy on the class's rows (None when the classifier does not know it)."""
        keys = [k for k in self.scored if _class_of(k, None) == label]
        scored = sum(self.scored[k] for k in keys)
        return sum(self.correct[k] for k in keys) / scored if scored else None


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


@dataclass(frozen=True)
class Side:
    """One set of images to measure: a shard root's split, sampled per class."""

    uri: str
    split: str
    thresholds: dict[str, float]  # per capped class (sample_thresholds); a class absent: all rows
    halves: bool  # key rows by patient half too (the real side, for the floor)


@dataclass(frozen=True)
class FeatureCompute:
    """How the feature actors run (the compute fields of ``FDDConfig``)."""

    batch_rows: int  # rows per actor call; each call emits one partial statistic per class
    inference_batch: int  # images per forward pass
    workers: int | None  # feature actors; None: one per GPU with GPUs, else 1
    use_gpu: bool | None  # None: use GPUs when the cluster has them
    cpus_per_worker: float  # Ray CPUs per actor (also its torch threads, on CPU)
    s3_endpoint: str | None = None  # S3-compatible endpoint for s3:// shard roots


def side_statistics(sides: Sequence[Side], *, classes: Sequence[str], files: ArtifactFiles,
                    config: FeatureCompute) -> list[SideStats]:
    """Run every side through one pipeline (one actor pool, the model loaded once per actor)."""
    import ray

    from cxrfactory.raydata import read_shards

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if config.use_gpu is None else config.use_gpu
    if use_gpu and not gpus:
        raise FDDError("GPU feature actors were asked for, but the Ray cluster has no GPU")
    parts = []
    for index, side in enumerate(sides):
        ds, _ = read_shards(side.uri, split=side.split, classes=list(classes),
                            columns=["image", "image_id", "label", "split", "patient_id"],
                            s3_endpoint=config.s3_endpoint)
        parts.append(ds.map_batches(select_rows, batch_format="pyarrow", fn_kwargs={
            "side": index, "thresholds": dict(side.thresholds), "halves": side.halves}))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"artifact": files, "inference_batch": config.inference_batch,
                               "threads": max(1, int(config.cpus_per_worker))},
        batch_size=config.batch_rows, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=config.workers or (gpus if use_gpu else 1)),
        num_cpus=config.cpus_per_worker, num_gpus=1 if use_gpu else 0,
    )
    total, correct, scored = FeatureStats(), Counter(), Counter()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        total = total.merge(FeatureStats.from_arrays(batch))
        for key, hit, seen in zip(batch["label"], batch["correct"], batch["scored"]):
            correct[str(key)] += int(hit)
            scored[str(key)] += int(seen)
    results = []
    for index in range(len(sides)):
        prefix = f"{index}:"
        mine = {k[len(prefix):]: k for k in scored if k.startswith(prefix)}
        results.append(SideStats(
            _relabel(total, lambda key: key[len(prefix):] if key.startswith(prefix) else None),
            {k: correct[full] for k, full in mine.items()}, {k: scored[full] for k, full in mine.items()}))
    return results

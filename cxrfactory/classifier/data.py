"""What every epoch of classifier training is made of, and the Ray Data input that makes it.

Synthetic mixing: ``synthetic_ratio`` r makes synthetic rows a fraction r of every epoch
(``r / (1 - r)`` synthetic rows per real row, per class, so the class mix stays the real one);
``balance_per_class`` T gives every class T rows per epoch, real rows first and synthetic ones
filling the gap (the "real + synthetic balanced to a target" utility experiment; without
synthetic roots it only caps the real rows, e.g. NIH's 60 % Normal); with neither, every
synthetic row is used as given. A class drawn partly keeps a fixed subset, chosen by a hash of
``image_id`` under the run's seed, so counts are exact and a rerun trains on the same rows.
The plan is made on the driver without Ray; :func:`build_datasets` turns it into Ray datasets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cxrfactory import shards
from cxrfactory.classifier.config import ClassifierConfig, ClassifierError
from cxrfactory.labels import class_index, multi_hot, validate_classes
from cxrfactory.models.densenet import Preprocessing, decode_images

#: Rows per Ray Data decode task: amortises task overhead, still streams.
DECODE_BATCH_ROWS = 64


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

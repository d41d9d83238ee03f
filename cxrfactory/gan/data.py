"""Real shards -> Ray Data -> ready tensors per generator branch, for the GAN training loop.

An epoch is one pass over the real training split. With ``class_balanced`` the pass is drawn
so that every class contributes the same number of rows ``T = ceil(N / K)`` (N train rows, K
classes), which keeps the epoch as long as the natural one while a rare class (NIH has 322
Pneumonia images against 60,000 Normal ones) is repeated instead of starved: a class of ``n``
rows contributes every row ``T // n`` times plus ``T % n`` rows drawn without replacement
(a class with ``n > T`` rows: ``T`` rows without replacement).

Why exact counts rather than a row-level Bernoulli sampler: the epoch length must be known in
advance. Every worker takes the same number of steps (each step is a collective), epochs end
at fixed step counts (the tau schedule follows epochs), and a resumed run ends at the same
final step as an uninterrupted one.

How, in Ray Data, streaming and stateless: :class:`BalancedDraw` (a map over the read blocks)
knows each class's sorted image ids, so from one seed it computes the same per-row copy counts
in every task and repeats each row that often; then one global ``random_shuffle``. Both take
their randomness from ``RandomSeedConfig(seed, reseed_after_execution=True)``: reproducible for
a seed, and different in every epoch (each epoch is a new execution of the dataset). Which
worker receives which rows is Ray Data's dynamic split, so the order is seeded, not bit-exact;
a resumed run continues the model exactly but draws its data afresh.

Preprocessing also runs in Ray Data (:class:`BranchPreprocessor`): PNG decode, antialiased
resize to the top branch's side, area down-sampling to every lower branch (the same pyramid
:class:`~cxrfactory.gan.step.GANTrainer` builds from a single tensor) and scaling to
[-1, 1], so the training workers receive ready tensors.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cxrfactory.errors import UserError
from cxrfactory.images import to_grayscale
from cxrfactory import shards
from cxrfactory.storage import check_readable, resolve

TRAIN_SPLIT = "train"
#: Columns the training pipeline reads; the rest of the shard schema is never loaded.
COLUMNS = ("image_id", "image", "label", "split")
#: Rows per preprocessing task: large enough to amortise task overhead, small enough to stream.
PREPROCESS_BATCH_ROWS = 64


class TrainingDataError(UserError, ValueError):
    """Shards that cannot feed this training run (missing class, too few images, ...)."""


@dataclass(frozen=True)
class EpochPlan:
    """How one epoch is drawn from the real train split and cut into steps."""

    classes: tuple[str, ...]  # the model's condition vocabulary, in order
    class_counts: dict[str, int]  # train rows per class in the shards
    per_class: int | None  # rows drawn per class per epoch when class-balanced, else None
    global_batch: int  # real images per step, all workers together
    num_workers: int  # data-parallel replicas

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochPlan:
        """The plan from ``dataclasses.asdict(plan)`` after a trip through a Ray Train loop
        config or JSON, which may turn the classes into a list."""
        return cls(**{**data, "classes": tuple(data["classes"])})

    @property
    def rows(self) -> int:
        """Rows in one epoch's stream."""
        if self.per_class is None:
            return sum(self.class_counts.values())
        return self.per_class * len(self.classes)

    @property
    def worker_batch(self) -> int:
        """Real images per step on one worker."""
        return self.global_batch // self.num_workers

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one epoch. Ray's equal streaming split gives each worker ``rows // W`` rows
        and every worker drops its last partial batch, so all take exactly this many."""
        return (self.rows // self.num_workers) // self.worker_batch

    def epoch_draw(self, label: str) -> tuple[int, int]:
        """``(full copies, extra rows drawn without replacement)`` of a class in one epoch."""
        n = self.class_counts[label]
        if self.per_class is None:
            return 1, 0
        return divmod(self.per_class, n)


def plan_epochs(
    manifest: shards.Manifest,
    classes: Sequence[str],
    *,
    class_balanced: bool,
    global_batch: int,
    num_workers: int,
    data_uri: str = "",
) -> EpochPlan:
    """Check that the shards can train ``classes`` and fix the epoch's composition.

    Raises :class:`TrainingDataError` naming the problem: a class the shards lack, a class
    without training images, or a split smaller than one global batch.
    """
    where = data_uri or "the shards"
    missing = [c for c in classes if c not in manifest.classes]
    if missing:
        raise TrainingDataError(
            f"{where} has no class {', '.join(missing)} (it holds {', '.join(manifest.classes)}); "
            "ingest those classes or train on fewer (model.classes)"
        )
    if TRAIN_SPLIT not in manifest.counts:
        raise TrainingDataError(f"{where} has no '{TRAIN_SPLIT}' split (it holds "
                                f"{', '.join(manifest.counts) or 'none'}); is it a real-image shard folder?")
    train_counts = manifest.counts[TRAIN_SPLIT]
    counts = {c: int(train_counts.get(c, 0)) for c in classes}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise TrainingDataError(
            f"class {', '.join(empty)} has no training images in {where}; the model cannot learn "
            "a condition it never sees: add images of it or drop it from model.classes"
        )
    total = sum(counts.values())
    per_class = math.ceil(total / len(classes)) if class_balanced else None
    plan = EpochPlan(tuple(classes), counts, per_class, global_batch, num_workers)
    if plan.steps_per_epoch < 1:
        raise TrainingDataError(
            f"{where} has {total} training images, fewer than one step needs "
            f"({global_batch} images, {plan.worker_batch} per worker on {num_workers} worker(s)); "
            "lower --batch-size or add images"
        )
    return plan


def read_train_manifest(data_uri: str, s3_endpoint: str | None = None) -> shards.Manifest:
    """The manifest of a real shard folder, verified (every listed shard present)."""
    root = resolve(data_uri, s3_endpoint)
    check_readable(root, "shard folder")
    return shards.read_manifest(root)


# --------------------------------------------------------------------------------------------
# Ray Data pipeline


def read_class_ids(data_uri: str, classes: Sequence[str], *, split: str = TRAIN_SPLIT,
                   s3_endpoint: str | None = None) -> dict[str, np.ndarray]:
    """Sorted image ids of each class in a split, from the shards' small columns only."""
    import pyarrow.parquet as pq

    root = resolve(data_uri, s3_endpoint)
    manifest = shards.read_manifest(root)
    ids: dict[str, list[str]] = {c: [] for c in classes}
    for rel in shards.select_files(manifest, ids, split):
        label = shards.shard_class(rel)
        with root.fs.open_input_file(root.join(rel).path) as f:
            table = pq.read_table(f, columns=["image_id", "split"])
        ids[label].extend(table.filter(pc.equal(table.column("split"), split)).column("image_id").to_pylist())
    return {c: np.array(sorted(v)) for c, v in ids.items()}


@dataclass(frozen=True)
class BalancedDraw:
    """Ray Data stage: repeat every row as often as this epoch's class-balanced draw says.

    Stateless: every task derives the same per-class counts from ``(seed, execution index,
    class)`` and finds a row's place in its class by its image id, so the epoch holds exactly
    ``per_class`` rows of each class however the blocks are spread over tasks.
    """

    seed: int
    per_class: int
    class_ids: dict[str, np.ndarray]  # sorted image ids of each class's train rows

    def counts(self, label: str, execution: int) -> np.ndarray:
        """Copies of each row of ``label`` (in id order) in the epoch of this execution."""
        ids = self.class_ids[label]
        full, extra = divmod(self.per_class, len(ids))
        class_index = list(self.class_ids).index(label)
        rng = np.random.default_rng([self.seed, execution, class_index])
        picked = rng.choice(len(ids), size=extra, replace=False)
        return full + np.bincount(picked, minlength=len(ids))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ray.data import DataContext, RandomSeedConfig

        seed = RandomSeedConfig(seed=self.seed, reseed_after_execution=True)
        execution = seed.get_seed_tuple(data_context=DataContext.get_current()).execution_idx or 0
        labels = np.array(batch.column("label").to_pylist())
        image_ids = np.array(batch.column("image_id").to_pylist())
        copies = np.zeros(len(labels), dtype=np.int64)
        for label in np.unique(labels):
            rows = labels == label
            known = self.class_ids[label]
            ranks = np.minimum(np.searchsorted(known, image_ids[rows]), len(known) - 1)
            if not (known[ranks] == image_ids[rows]).all():
                raise TrainingDataError(f"a {label} row is not among the ids the epoch was planned with")
            copies[rows] = self.counts(str(label), execution)[ranks]
        return batch.take(np.repeat(np.arange(batch.num_rows), copies))


def build_train_dataset(
    data_uri: str,
    plan: EpochPlan,
    resolutions: Sequence[int],
    *,
    seed: int,
    s3_endpoint: str | None = None,
):
    """One epoch's stream of ready rows: ``image_b{i}`` float32 ``(1, R_i, R_i)`` in [-1, 1] per
    branch and ``label`` (class index). Each execution (epoch) draws and shuffles anew."""
    from cxrfactory.raydata import quiet_datasets

    with quiet_datasets():
        return _train_dataset(data_uri, plan, resolutions, seed=seed, s3_endpoint=s3_endpoint)


def _train_dataset(data_uri: str, plan: EpochPlan, resolutions: Sequence[int], *, seed: int,
                   s3_endpoint: str | None):
    from ray.data import RandomSeedConfig

    from cxrfactory.raydata import read_shards

    ds, _ = read_shards(data_uri, split=TRAIN_SPLIT, classes=list(plan.classes),
                        s3_endpoint=s3_endpoint, columns=COLUMNS)
    if plan.per_class is not None:
        class_ids = read_class_ids(data_uri, plan.classes, s3_endpoint=s3_endpoint)
        found = {c: len(v) for c, v in class_ids.items()}
        if found != plan.class_counts:
            raise TrainingDataError(f"{data_uri}: the shards hold {found} train rows per class but the "
                                    f"manifest says {plan.class_counts}; re-run the ingest")
        ds = ds.map_batches(BalancedDraw(seed, plan.per_class, class_ids), batch_format="pyarrow")
    ds = ds.select_columns(["image", "label"])
    ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return ds.map_batches(
        BranchPreprocessor(plan.classes, tuple(resolutions)),
        batch_format="pyarrow",
        batch_size=PREPROCESS_BATCH_ROWS,
    )


@dataclass(frozen=True)
class BranchPreprocessor:
    """Ray Data stage: PNG rows -> per-branch float32 images in [-1, 1] and class indices."""

    classes: tuple[str, ...]
    resolutions: tuple[int, ...]  # branch sides, low to high

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        images = batch.column("image").combine_chunks().field("bytes").to_pylist()
        index = {c: i for i, c in enumerate(self.classes)}
        labels = np.array([index[x] for x in batch.column("label").to_pylist()], dtype=np.int64)
        top = self.resolutions[-1]
        pixels = np.stack([decode_resized(data, top) for data in images])  # (B, R, R) uint8
        out = {f"image_b{i}": x.numpy() for i, x in enumerate(branch_pyramid(pixels, self.resolutions))}
        out["label"] = labels
        return out


def decode_resized(data: bytes, side: int) -> np.ndarray:
    """PNG bytes -> uint8 ``(side, side)``, antialiased (Lanczos) when the shard's side differs."""
    with Image.open(io.BytesIO(data)) as img:
        gray = to_grayscale(img)
        if gray.size != (side, side):
            gray = gray.resize((side, side), Image.Resampling.LANCZOS)
        return np.asarray(gray)


def branch_pyramid(pixels: np.ndarray, resolutions: Sequence[int]) -> list[Tensor]:
    """uint8 ``(B, R, R)`` at the top side -> one float32 ``(B, 1, r, r)`` in [-1, 1] per branch.

    Lower branches are area averages of the top image (the antialiased 2^k down-sample),
    exactly what ``GANTrainer`` derives when it is given the top image alone.
    """
    top = torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(1).float().div_(127.5).sub_(1.0)
    return [top if r == top.shape[-1] else F.interpolate(top, size=(r, r), mode="area")
            for r in resolutions]


def batch_to_tensors(batch: dict[str, Tensor], num_branches: int, num_classes: int,
                     device: torch.device | str = "cpu") -> tuple[list[Tensor], Tensor]:
    """A batch from ``iter_torch_batches`` -> ``(reals per branch, one-hot conditions)``."""
    reals = [batch[f"image_b{i}"].to(device, non_blocking=True) for i in range(num_branches)]
    c = F.one_hot(batch["label"].long(), num_classes).float().to(device, non_blocking=True)
    return reals, c


def load_split_tensors(data_uri: str, classes: Sequence[str], resolutions: Sequence[int], *,
                       split: str = TRAIN_SPLIT, s3_endpoint: str | None = None) -> tuple[list[Tensor], Tensor]:
    """A whole split in memory without Ray: ``(images per branch, class indices)``.

    For plain single-process loops (the throughput baseline, notebooks) on small shard sets.
    """
    import pyarrow.parquet as pq

    root = resolve(data_uri, s3_endpoint)
    manifest = shards.read_manifest(root)
    tables = []
    for rel in shards.select_files(manifest, classes, split):
        with root.fs.open_input_file(root.join(rel).path) as f:
            table = pq.read_table(f, columns=list(COLUMNS))
        tables.append(table.filter(pc.equal(table.column("split"), split)))
    if not tables:
        raise TrainingDataError(f"{data_uri} holds no {split} rows of {', '.join(classes)}")
    batch = BranchPreprocessor(tuple(classes), tuple(resolutions))(pa.concat_tables(tables))
    images = [torch.from_numpy(batch[f"image_b{i}"]) for i in range(len(resolutions))]
    return images, torch.from_numpy(batch["label"])

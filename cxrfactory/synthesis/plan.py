"""What a synthesis run makes: its config, the per-image seeds and the plan of files.

Per class ``N`` rows, or ``N`` minus its real count in ``balance_against`` (never below 0), cut
into work items, one per output file: ``(class, [start, stop))``. Image ``i`` of class ``k``
has the seed ``image_seed(run_seed, k, i)`` (docs/architecture.md, "Seeds"). No Ray here.

With excluded images (a memorization audit's flags, ``exclude_flagged``), a class skips the
indices whose image is excluded and takes the first ``to_generate`` indices that are not: the
replacements come from further seeds, and every row is still ``image_seed(run_seed, k, i)``
for its own ``i``. A work item then lists the indices of its range it skips.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from cxrfactory.errors import UserError
from cxrfactory import labels as L
from cxrfactory import shards
from cxrfactory.storage import check_readable, resolve

MIN_RESOLUTION = 8


class SynthesisError(UserError, ValueError):
    """A synthesis request that cannot be carried out, with what to change."""


@dataclass(frozen=True)
class SynthesisConfig:
    """Everything that defines a synthesis run (the job's flags, one to one)."""

    generator: str  # generator artifact folder: local path or s3:// URI
    out: str  # shard root: local path or s3://bucket/prefix
    target_per_class: int  # rows per class at the end (synthetic, or real + synthetic)
    classes: tuple[str, ...] | None = None  # classes to make; None: the generator's whole vocabulary
    balance_against: str | None = None  # real shard root: make N minus its count per class
    split: str = "train"  # the split of balance_against that is counted
    seed: int = 0  # run seed; image i of class k gets image_seed(seed, k, i)
    batch_size: int = 64  # images per generator forward pass
    rows_per_file: int = 1000  # rows per Parquet file
    resolution: int | None = None  # output side in px (LANCZOS resize); None: the generator's own
    workers: int = 1  # generator actors (Ray Data actor pool size)
    gpus_per_worker: float = 0.0  # GPUs per actor when the cluster has GPUs (0: CPU actors)
    cpus_per_worker: float | None = None  # CPUs per actor (torch and PNG threads); None: the cluster's CPUs shared by the actors (at most 8 with GPUs)
    s3_endpoint: str | None = None  # S3-compatible endpoint (else CXRF_S3_ENDPOINT / AWS)
    overwrite: bool = False  # replace whatever the output holds
    exclude_flagged: tuple[str, ...] = ()  # audit folders (jobs/audit.py --out): their flags are replaced
    command: str | None = None  # the command line that asked for it (for the dataset card)

    def __post_init__(self) -> None:
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "exclude_flagged", tuple(self.exclude_flagged))
        checks = [
            (self.target_per_class >= 1, f"--target-per-class must be positive, got {self.target_per_class}"),
            (self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.batch_size >= 1, f"--batch-size must be positive, got {self.batch_size}"),
            (self.rows_per_file >= 1, f"--rows-per-file must be positive, got {self.rows_per_file}"),
            (self.resolution is None or self.resolution >= MIN_RESOLUTION,
             f"--resolution must be at least {MIN_RESOLUTION} px, got {self.resolution}"),
            (self.workers >= 1, f"--workers must be positive, got {self.workers}"),
            (self.gpus_per_worker >= 0, f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}"),
            (self.cpus_per_worker is None or self.cpus_per_worker > 0,
             f"--cpus-per-worker must be positive, got {self.cpus_per_worker}"),
            (self.balance_against is not None or self.split == "train",
             "--split only applies with --balance-against"),
        ]
        for ok, message in checks:
            if not ok:
                raise SynthesisError(message)


@dataclass(frozen=True)
class ClassPlan:
    """One row of the plan table: what a class gets."""

    label: str
    class_index: int  # position in the generator's vocabulary (the condition and the seed use it)
    real: int  # real rows counted in balance_against's split (0 without it)
    to_generate: int  # synthetic rows to make: max(0, target - real)
    skip: tuple[int, ...] = ()  # excluded indices the class walks past (sorted), each replaced

    @property
    def replaced(self) -> int:
        """Excluded images of this class's range, each replaced by the next index's image."""
        return len(self.skip)


@dataclass(frozen=True)
class WorkItem:
    """One output file: images ``[start, stop)`` of one class, less the indices in ``skip``."""

    path: str  # relative to the output root, train/<Class>/part-0000k.parquet (shards.shard_path)
    label: str
    class_index: int
    start: int
    stop: int
    skip: tuple[int, ...] = ()  # excluded indices in [start, stop), sorted

    @property
    def rows(self) -> int:
        return self.stop - self.start - len(self.skip)

    def as_row(self) -> dict[str, object]:
        """The item as a Ray Data row. ``skip`` travels as text ("3 7"): Ray Data's NumPy batches
        give a ragged (or empty) list column another type than a filled one."""
        return {"path": self.path, "label": self.label, "class_index": self.class_index,
                "start": self.start, "stop": self.stop, "skip": " ".join(map(str, self.skip))}


def image_seed(run_seed: int, class_index: int, image_index: int) -> int:
    """The per-image seed: a stable 63-bit hash of ``(run seed, class index, image index)``.

    sha256 of a canonical string rather than arithmetic, so seeds of neighbouring runs, classes
    and indices share no structure, and the value is the same on every platform and version.
    """
    key = f"cxrfactory-image-seed:{int(run_seed)}:{int(class_index)}:{int(image_index)}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


def image_seeds(run_seed: int, class_index: int, start: int, stop: int,
                skip: Collection[int] = ()) -> list[int]:
    """Seeds of images ``[start, stop)`` of a class, without the indices in ``skip``."""
    skip = frozenset(skip)
    return [image_seed(run_seed, class_index, i) for i in range(start, stop) if i not in skip]


def synthetic_image_id(label: str, seed: int) -> str:
    """The synthetic rows' ``image_id``: ``syn-<Class>-<seed>``."""
    return f"syn-{label}-{seed}"


def real_counts(uri: str, split: str, s3_endpoint: str | None = None) -> dict[str, int]:
    """Rows per class of ``split`` in a real shard folder (from its manifest)."""
    root = resolve(uri, s3_endpoint)
    check_readable(root, "--balance-against folder")
    manifest = shards.read_manifest(root)
    if split not in manifest.counts:
        raise SynthesisError(f"--balance-against {uri} has no split {split!r}; it holds "
                             f"{', '.join(manifest.counts) or 'no rows'}")
    return dict(manifest.counts[split])


def plan_classes(classes: Sequence[str], vocabulary: Sequence[str], target: int,
                 real: dict[str, int] | None = None) -> list[ClassPlan]:
    """Per class (vocabulary order): real count and how many to make so real + synthetic = target."""
    plan = []
    for label in L.validate_classes(classes, vocabulary):
        have = int((real or {}).get(label, 0))
        plan.append(ClassPlan(label, L.class_index(label, vocabulary), have, max(0, target - have)))
    return plan


def exclude_images(plan: Sequence[ClassPlan], run_seed: int,
                   excluded: Collection[str]) -> list[ClassPlan]:
    """The plan with each class skipping the indices whose image id is in ``excluded``.

    A class walks indices 0, 1, 2, ... and takes the first ``to_generate`` whose image
    (``synthetic_image_id(label, image_seed(run_seed, k, i))``) is not excluded, so each
    excluded image of its range is replaced by the image of the next free index.
    """
    excluded = frozenset(excluded)
    if not excluded:
        return list(plan)
    out = []
    for cls in plan:
        skip, taken, i = [], 0, 0
        while taken < cls.to_generate:
            if synthetic_image_id(cls.label, image_seed(run_seed, cls.class_index, i)) in excluded:
                skip.append(i)
            else:
                taken += 1
            i += 1
        out.append(dataclasses.replace(cls, skip=tuple(skip)))
    return out


def plan_work(plan: Sequence[ClassPlan], rows_per_file: int) -> list[WorkItem]:
    """One work item per output file: ``rows_per_file`` image indices of a class, consecutive
    but for the class's ``skip``; a file starts at its first index and stops after its last."""
    items = []
    for cls in plan:
        skip = frozenset(cls.skip)
        # The class uses the indices [0, to_generate + replaced) less its skip.
        taken = [i for i in range(cls.to_generate + cls.replaced) if i not in skip]
        for k, first in enumerate(range(0, cls.to_generate, rows_per_file)):
            indices = taken[first:first + rows_per_file]
            start, stop = indices[0], indices[-1] + 1
            path = shards.shard_path(shards.SYNTHETIC_SPLIT, cls.label, k)
            items.append(WorkItem(path, cls.label, cls.class_index, start, stop,
                                  tuple(i for i in cls.skip if start <= i < stop)))
    return items


def format_plan(plan: Sequence[ClassPlan], written: dict[str, int] | None = None) -> str:
    """The plan table (class, real, to generate, total); with ``written``, the final summary.
    A plan with excluded images adds the column ``replaced`` (rows from further seeds)."""
    width = max([len(p.label) for p in plan] + [5])
    third = "synthetic" if written is not None else "to generate"
    extra = any(p.skip for p in plan)
    header = f"{'class':<{width}} {'real':>9} {third:>11} {'total':>9}" + (f" {'replaced':>9}" * extra)
    made = {p.label: p.to_generate if written is None else written.get(p.label, 0) for p in plan}
    rows = [(p.label, p.real, made[p.label], p.replaced) for p in plan]
    rows.append(("total", sum(p.real for p in plan), sum(made.values()), sum(p.replaced for p in plan)))
    lines = [f"{label:<{width}} {real:>9} {n:>11} {real + n:>9}" + (f" {r:>9}" * extra)
             for label, real, n, r in rows]
    rule = "-" * len(header)
    return "\n".join([header, rule, *lines[:-1], rule, lines[-1]])

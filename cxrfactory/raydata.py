"""Shards as Ray Data datasets: the readers every Ray pipeline of the project starts from.

Only the files the manifest lists are read (a stray or half-written file is never data), and
the ``label`` column comes from the files themselves (``partitioning=None``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data.expressions import col

from cxrfactory import shards
from cxrfactory.storage import Location, check_readable, resolve


def train_worker_resources(*, num_workers: int, use_gpu: bool,
                           cpus_per_worker: float | None = None,
                           cluster_cpus: float | None = None) -> dict[str, float]:
    """Ray resources of one Ray Train worker that reads a Ray Data stream.

    A worker's CPUs come out of Ray Data's budget, so on a CPU cluster the workers take at
    most ``cluster CPUs - 1`` together (a quarter CPU each at the least) and Ray Data keeps
    one CPU for reading and decoding; with GPUs each worker takes 1 CPU and 1 GPU.
    ``cpus_per_worker`` overrides the CPUs; ``cluster_cpus`` defaults to the running cluster's.
    """
    if cpus_per_worker is not None:
        cpus = cpus_per_worker
    elif use_gpu:
        cpus = 1.0
    else:
        total = ray.cluster_resources().get("CPU", 1.0) if cluster_cpus is None else cluster_cpus
        cpus = min(1.0, max(total - 1.0, 0.25) / num_workers)
    return {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {})}


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """Datasets created inside draw no progress bars and log no execution plans.

    For the datasets a Ray Train worker consumes: they execute once per epoch inside Ray's
    split coordinator, where each execution would log its plan and a progress bar, five lines
    an epoch; the trainer prints its own progress. A dataset keeps the context it was made
    in, so the settings hold wherever it executes.
    """
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def shard_uris(root: Location, manifest: shards.Manifest, classes: Sequence[str] | None = None,
               split: str | None = None) -> list[str]:
    """Filesystem paths of the listed shards that may hold ``classes`` in ``split``."""
    return [root.join(f).path for f in shards.select_files(manifest, classes, split)]


def read_shards(
    uri: str,
    *,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    s3_endpoint: str | None = None,
    columns: Sequence[str] | None = None,
) -> tuple[ray.data.Dataset, shards.Manifest]:
    """``(dataset, manifest)`` for a shard root, optionally one split and some classes."""
    root = resolve(uri, s3_endpoint)
    check_readable(root, "shard folder")
    manifest = shards.read_manifest(root)
    if classes is not None:
        unknown = [c for c in classes if c not in manifest.classes]
        if unknown:
            raise shards.ManifestError(f"{uri} has no class {unknown}; it holds {', '.join(manifest.classes)}")
    if split is not None and split not in manifest.counts:
        raise shards.ManifestError(f"{uri} has no split {split!r}; it holds {', '.join(manifest.counts)}")
    paths = shard_uris(root, manifest, classes, split)
    if not paths:
        raise shards.ManifestError(f"{uri} lists no shard for classes {classes}")
    # Ray 2.60's V2 Parquet datasource lists files in a ListFiles task whose reused worker
    # fails with "cannot import name 'HTTPFileSystem'" when aiohttp is absent (the second
    # read of a session); the V1 reader takes our explicit file list as given, and is faster.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    ds = ray.data.read_parquet(paths, filesystem=root.fs, partitioning=None,
                               columns=list(columns) if columns else None)
    if split is not None:
        ds = ds.filter(expr=col("split") == split)
    return ds, manifest


# ---------------------------------------------------------------------------------------------
# Exact, deterministic per-class subsets (FDD's --max-per-class, the classifier's synthetic mix)


def stable_fraction(keys: Iterable[Any], salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per key, a function of ``(salt, key)`` alone."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{salt}:{k}".encode(), digest_size=8).digest(),
                                    "big") / 2.0**64 for k in keys], dtype=np.float64)


def sample_thresholds(uri: str, *, split: str, available: Mapping[str, int],
                      wanted: Mapping[str, int] | None, salt: str,
                      s3_endpoint: str | None = None) -> dict[str, float]:
    """Per class holding more rows than ``wanted``, the :func:`stable_fraction` of ``image_id``
    at or below which exactly ``wanted`` rows fall (see :func:`keep_sampled`).

    Reads only the ids of those classes: the choice is exact and the same on every run, at
    the cost of one pass over a string column instead of a shuffle per class.
    """
    capped = [c for c, n in (wanted or {}).items() if n < available.get(c, 0)]
    if not capped:
        return {}
    ds, _ = read_shards(uri, split=split, classes=capped, columns=["image_id", "label", "split"],
                        s3_endpoint=s3_endpoint)
    ids = ds.select_columns(["image_id", "label"]).to_pandas()
    thresholds = {}
    for label, group in ids.groupby("label"):
        fractions = np.sort(stable_fraction(group["image_id"], salt))
        thresholds[str(label)] = float(fractions[wanted[str(label)] - 1])
    return thresholds


def keep_sampled(batch: pa.Table, *, thresholds: Mapping[str, float], salt: str) -> pa.Table:
    """Ray Data stage (``batch_format="pyarrow"``): the rows whose ``image_id`` fraction is at
    or below their class's threshold; a class without a threshold keeps every row."""
    limit = np.array([thresholds.get(c, math.inf) for c in batch.column("label").to_pylist()])
    keep = stable_fraction(batch.column("image_id").to_pylist(), salt) <= limit
    return batch.filter(pa.array(keep, type=pa.bool_()))

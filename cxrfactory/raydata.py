"""Shards as Ray Data datasets: the readers every Ray pipeline of the project starts from.

Only the files the manifest lists are read (a stray or half-written file is never data), and
the ``label`` column comes from the files themselves, so hive partitioning is not re-parsed.
"""

from __future__ import annotations

from collections.abc import Sequence

import ray
from ray.data.expressions import col

from cxrfactory import shards
from cxrfactory.storage import Location, check_readable, resolve


def shard_uris(root: Location, manifest: shards.Manifest, classes: Sequence[str] | None = None) -> list[str]:
    """Filesystem paths of the listed shards, restricted to ``classes`` by their partition."""
    wanted = None if classes is None else {f"label={c}" for c in classes}
    return [root.join(f).path for f in manifest.files
            if wanted is None or f.split("/", 1)[0] in wanted]


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
            raise ValueError(f"{uri} has no class {unknown}; it holds {', '.join(manifest.classes)}")
    if split is not None and split not in manifest.counts:
        raise ValueError(f"{uri} has no split {split!r}; it holds {', '.join(manifest.counts)}")
    paths = shard_uris(root, manifest, classes)
    if not paths:
        raise ValueError(f"{uri} lists no shard for classes {classes}")
    ds = ray.data.read_parquet(paths, filesystem=root.fs, partitioning=None,
                               columns=list(columns) if columns else None)
    if split is not None:
        ds = ds.filter(expr=col("split") == split)
    return ds, manifest

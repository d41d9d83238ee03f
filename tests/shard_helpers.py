"""Small builders several test modules share: a tiny generator artifact and a shard set of
hand-made rows (imported as ``tests.shard_helpers``; not a test module)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from cxrfactory import shards
from cxrfactory.gan.artifact import save_generator_artifact
from cxrfactory.gan.config import Config, ModelConfig
from cxrfactory.models import build_generator
from cxrfactory.storage import Location, resolve


def save_tiny_generator(dest: str | Path | Location, classes: Sequence[str], *, ngf: int = 16,
                        z_dim: int = 16) -> str:
    """A 16-px generator artifact (seeded), weights scaled so images of different seeds differ:
    pixel std ~20 grey levels instead of ~0.5. ``dest``: a path, or a Location (S3 keeps its
    endpoint)."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(classes=tuple(classes), ngf=ngf, base_resolution=8,
                                      num_branches=2, z_dim=z_dim))
    net = build_generator(config)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.mul_(2.0)
    return save_generator_artifact(str(dest) if isinstance(dest, Path) else dest, net, config)


def write_synthetic_set(out: Path, rows: Sequence[dict], classes: Sequence[str]) -> Path:
    """A finished shard set (split "synthetic") of the given rows, one file per class that has any."""
    root = resolve(str(out))
    files, counts = [], {}
    for label in classes:
        part = [r for r in rows if r["label"] == label]
        if part:
            files.append(shards.shard_path("synthetic", label, 0))
            shards.write_shard(root.join(files[-1]), shards.make_table(part))
            counts[label] = len(part)
    shards.write_manifest(root, shards.Manifest(source="synthetic", classes=list(classes),
                                                counts={"synthetic": counts}, files=files))
    return out

"""Synthetic shard rows: the stored PNG of a generated image, its row, and its regeneration.

Every row keeps its seed and the generator's sha256, so :func:`regenerate` remakes its image
bit for bit on the same platform.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from cxrfactory import labels as L
from cxrfactory import shards
from cxrfactory.gan.artifact import GeneratorArtifact
from cxrfactory.images import encode_png
from cxrfactory.models.sampling import generate
from cxrfactory.synthesis.plan import SynthesisError, synthetic_image_id

SOURCE = "synthetic"


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 ``(H, W)`` -> ``(resolution, resolution)``, antialiased (PIL LANCZOS)."""
    if image.shape == (resolution, resolution):
        return image
    return np.asarray(Image.fromarray(image, mode="L").resize((resolution, resolution),
                                                              Image.Resampling.LANCZOS))


def encode_image(image: np.ndarray, resolution: int) -> bytes:
    """Generator output -> the stored PNG (resized first when ``resolution`` differs)."""
    return encode_png(resize_image(image, resolution))


def synthetic_rows(label: str, seeds: Sequence[int], pngs: Sequence[bytes], resolution: int,
                   generator_sha256: str) -> list[dict[str, Any]]:
    """Rows of the shard schema (docs/architecture.md, "Shards") for generated images (PNG bytes, square ``resolution`` px)."""
    findings = [] if label == "Normal" else [label]
    rows = []
    for seed, png in zip(seeds, pngs, strict=True):
        image_id = synthetic_image_id(label, seed)
        rows.append({
            "image_id": image_id, "image": {"bytes": png, "path": f"{image_id}.png"},
            "label": label, "findings": list(findings), "split": shards.SYNTHETIC_SPLIT,
            "patient_id": None, "source": SOURCE, "seed": int(seed), "generator": generator_sha256,
            "height": resolution, "width": resolution,
        })
    return rows


def regenerate(row: dict[str, Any], artifact: GeneratorArtifact, *,
               device: str | torch.device = "cpu") -> np.ndarray:
    """Remake a synthetic row's image from its seed: uint8 ``(height, width)``.

    ``row`` needs ``label``, ``seed``, ``generator``, ``height`` and ``width`` (a shard row as
    read back). The image is made alone (a batch of one): on a CPU whose kernels do not depend
    on the batch size (this project's: tested) it is the stored image bit for bit; on a GPU,
    where they do, a pixel may differ by one grey level (under 1% of them, BENCHMARKS.md).
    """
    if row.get("seed") is None or row.get("generator") is None:
        raise SynthesisError(f"row {row.get('image_id')!r} is not synthetic: it has no seed/generator")
    if row["generator"] != artifact.sha256:
        raise SynthesisError(f"row {row.get('image_id')!r} was made by generator "
                             f"{row['generator'][:12]}…, not by this artifact ({artifact.sha256[:12]}…)")
    index = L.class_index(row["label"], artifact.classes)
    image = generate(artifact.generator, [index], [int(row["seed"])], device=device, batch_size=1)[0]
    return resize_image(image, int(row["height"]))

"""Training figures: loss curves (the paper's Fig. 2) and per-class sample grids (its Table 2).

Both render with matplotlib's object API (no pyplot state, no display needed) into PNG bytes,
so a run folder on S3 receives them with one atomic write like every other file. matplotlib is
imported inside the functions that draw: a Ray Train worker imports this module, and only the
chief worker draws, every few thousand steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrfactory.images import figure_png
from cxrfactory.models.sampling import to_uint8
from cxrfactory.storage import Location, resolve

if TYPE_CHECKING:
    from torch import Tensor

#: Pixels of background between sample tiles and between branch groups.
TILE_GAP = 2
GROUP_GAP = 8


def _write(out: str | Location, data: bytes) -> None:
    (out if isinstance(out, Location) else resolve(out)).write_bytes(data)


# --------------------------------------------------------------------------------------------
# Loss curves


def loss_curves_png(records: Sequence[Mapping[str, Any]], title: str = "") -> bytes:
    """G and D losses against steps, total and per branch, from ``metrics.jsonl`` records.

    Left panel: the discriminator (paper eq. 5, both heads summed); right: the generator
    (eq. 6). Thin lines are branches (64/128/256 px in the paper), thick lines the totals.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100, layout="constrained")
    for ax, prefix, name in zip(fig.subplots(1, 2), ("d", "g"), ("discriminator", "generator")):
        rows = [r for r in records if f"{prefix}_loss" in r]
        steps = [r["step"] for r in rows]
        branches = sorted({int(k.rsplit("_b", 1)[1]) for r in rows for k in r
                           if k.startswith(f"{prefix}_loss_b")})
        marker = "o" if len(rows) < 20 else None  # a short run's few points stay visible
        for b in branches:
            ax.plot(steps, [r.get(f"{prefix}_loss_b{b}", np.nan) for r in rows], lw=1, alpha=0.7, marker=marker,
                    label=f"branch {b}" + (f" ({rows[0]['resolutions'][b]} px)" if "resolutions" in rows[0] else ""))
        ax.plot(steps, [r[f"{prefix}_loss"] for r in rows], lw=2, color="black", marker=marker, label="total")
        ax.set_xlabel("step (real batches)")
        ax.set_ylabel("LSGAN loss")
        ax.set_title(f"{name} loss")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return figure_png(fig)


def save_loss_curves(records: Sequence[Mapping[str, Any]], out: str | Location, title: str = "") -> None:
    """Write :func:`loss_curves_png` to a path or storage location."""
    _write(out, loss_curves_png(records, title))


# --------------------------------------------------------------------------------------------
# Sample grids


def sample_mosaic(images: Sequence[Tensor], per_class: int) -> np.ndarray:
    """One uint8 mosaic: a row per class, a group of ``per_class`` columns per branch.

    ``images``: one ``(K * per_class, 1, r, r)`` tensor per branch in [-1, 1], rows ordered
    class-major (class 0's samples first). Every tile is shown at the top branch's size with
    nearest-neighbour enlargement, so a low branch's pixels stay visible as pixels.
    """
    if not images:
        raise ValueError("no branch images")
    total = images[0].shape[0]
    if total % per_class or any(x.shape[0] != total for x in images):
        raise ValueError(f"every branch needs K * {per_class} images, got {[x.shape[0] for x in images]}")
    classes = total // per_class
    side = max(x.shape[-1] for x in images)
    group_w = per_class * side + (per_class - 1) * TILE_GAP
    width = len(images) * group_w + (len(images) - 1) * GROUP_GAP
    height = classes * side + (classes - 1) * TILE_GAP
    mosaic = np.full((height, width), 255, dtype=np.uint8)
    for g, branch in enumerate(images):
        tiles = to_uint8(branch)  # (N, r, r)
        scale = side // tiles.shape[-1]
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
        for i, tile in enumerate(tiles):
            row, col = divmod(i, per_class)
            y = row * (side + TILE_GAP)
            x = g * (group_w + GROUP_GAP) + col * (side + TILE_GAP)
            mosaic[y:y + side, x:x + side] = tile
    return mosaic


def sample_grid_png(images: Sequence[Tensor], classes: Sequence[str], per_class: int,
                    title: str = "") -> bytes:
    """The mosaic with class names on the rows and each branch's resolution above its group."""
    from matplotlib.figure import Figure

    mosaic = sample_mosaic(images, per_class)
    side = max(x.shape[-1] for x in images)
    if len(classes) * per_class != images[0].shape[0]:
        raise ValueError(f"{len(classes)} classes x {per_class} samples != {images[0].shape[0]} images")
    h, w = mosaic.shape
    inches = max(4.0, w / 100)  # one mosaic pixel per output pixel at dpi 100: no resampling
    fig = Figure(figsize=(inches, inches * h / w + 0.5), dpi=100)
    ax = fig.subplots()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([r * (side + TILE_GAP) + side / 2 for r in range(len(classes))], labels=list(classes))
    group_w = per_class * side + (per_class - 1) * TILE_GAP
    ax.set_xticks([g * (group_w + GROUP_GAP) + group_w / 2 for g in range(len(images))],
                  labels=[f"{x.shape[-1]} px" for x in images])
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    return figure_png(fig, tight=True)  # tight: room for long class names on the y axis


def save_sample_grid(images: Sequence[Tensor], classes: Sequence[str], per_class: int,
                     out: str | Location, title: str = "") -> None:
    """Write :func:`sample_grid_png` to a path or storage location."""
    _write(out, sample_grid_png(images, classes, per_class, title))

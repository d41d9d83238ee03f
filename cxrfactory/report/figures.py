"""The report's own figures: the per-class sample table (the paper's Table 2) and class balance.

Training figures (loss curves, training sample grids) live in :mod:`cxrfactory.gan.plots`;
the sample table reuses its mosaic layout, with the columns being image sources (real, each
synthetic set) instead of generator branches. Rendering uses matplotlib's object API (no
pyplot state, no display).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from cxrfactory.images import figure_png
from cxrfactory.report.inputs import SampleImages

#: A tile with no image (a class a source does not hold) is left as background.
MISSING_TILE = 255


def fit_tile(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 ``(H, W)`` -> ``(side, side)``: antialiased when shrinking; pixel-exact
    (nearest) when enlarging, so a low-resolution generator is not flattered by smoothing."""
    if image.shape == (side, side):
        return image
    shrink = max(image.shape) > side
    method = Image.Resampling.LANCZOS if shrink else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(image, mode="L").resize((side, side), method))


def sample_table_png(sources: Sequence[SampleImages], classes: Sequence[str], per_class: int,
                     tile_px: int) -> bytes:
    """A row per class, a group of ``per_class`` tiles per source (real, then synthetic sets)."""
    # plots (and with it torch) is imported here, not at the top: a report without images
    # then starts in a fraction of the time.
    import torch

    from cxrfactory.gan.plots import GROUP_GAP, TILE_GAP, sample_mosaic

    if not sources or not classes:
        raise ValueError("the sample table needs at least one source and one class")
    groups = []
    for source in sources:
        tiles = np.full((len(classes) * per_class, tile_px, tile_px), MISSING_TILE, dtype=np.uint8)
        for row, label in enumerate(classes):
            for col, image in enumerate(source.images.get(label, [])[:per_class]):
                tiles[row * per_class + col] = fit_tile(image, tile_px)
        # plots.sample_mosaic takes generator outputs in [-1, 1]: (B, 1, r, r).
        groups.append(torch.from_numpy(tiles).float().div(127.5).sub(1.0).unsqueeze(1))
    mosaic = sample_mosaic(groups, per_class)  # (H, W) uint8
    h, w = mosaic.shape
    inches = max(4.0, w / 100)  # one mosaic pixel per output pixel at dpi 100
    fig = Figure(figsize=(inches, inches * h / w + 0.4), dpi=100)
    ax = fig.subplots()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([r * (tile_px + TILE_GAP) + tile_px / 2 for r in range(len(classes))],
                  labels=list(classes))
    group_w = per_class * tile_px + (per_class - 1) * TILE_GAP
    ax.set_xticks([g * (group_w + GROUP_GAP) + group_w / 2 for g in range(len(sources))],
                  labels=[s.source for s in sources])
    ax.xaxis.tick_top()
    ax.tick_params(length=0, labelsize=11)
    for spine in ax.spines.values():
        spine.set_visible(False)
    # X-rays and black text: one 8-bit channel halves the PNG and the report's base64.
    return figure_png(fig, tight=True, grayscale=True)


def class_balance_png(classes: Sequence[str], columns: Mapping[str, Mapping[str, int]], *,
                      reference: str | None = None) -> bytes:
    """Horizontal bars per class, one per column (e.g. real before balancing, then real +
    synthetic per set), counts printed at the bar ends; the ``reference`` column is grey."""
    if not columns:
        raise ValueError("no counts to plot")
    names = list(columns)
    height = 0.8 / len(names)
    fig = Figure(figsize=(8, 0.5 + 0.32 * len(classes) * max(1.5, len(names) * 0.75)), dpi=100,
                 layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(classes))
    largest = max([n for counts in columns.values() for n in counts.values()] + [1])
    for k, name in enumerate(names):
        values = [columns[name].get(c, 0) for c in classes]
        offset = (k - (len(names) - 1) / 2) * height
        ax.barh(y + offset, values, height=height * 0.92, label=name,
                color="#555555" if name == reference else f"C{k}")
        for yy, v in zip(y + offset, values):
            ax.text(v + largest * 0.01, yy, f"{v:,}", va="center", fontsize=7)
    ax.set_yticks(y, labels=list(classes))
    ax.invert_yaxis()  # vocabulary order top to bottom, like the tables
    ax.set_xlim(0, largest * 1.15)
    ax.set_xlabel("images")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
    return figure_png(fig, tight=True)

"""Precision, recall, density and coverage of generated samples in a feature space.

Naeem, Oh, Uh, Choi and Yoo, "Reliable Fidelity and Diversity Metrics for Generative Models",
ICML 2020 (precision and recall after Kynkäänniemi et al., "Improved Precision and Recall
Metric for Assessing Generative Models", NeurIPS 2019). The formulas are those of the authors'
reference implementation (clovaai/generative-evaluation-prdc), Euclidean distances:

- the radius of a point is the distance to its k-th nearest neighbour in its own set, self
  excluded: the (k + 1)-th smallest entry of its row of the self-distance matrix;
- precision: the share of fake points inside some real ball (distance < the real radius);
- recall: the share of real points inside some fake ball;
- density: (1 / k) times the mean over fake points of how many real balls hold them;
- coverage: the share of real points whose nearest fake point lies inside their own ball.

Every comparison is strict (``<``), as in the reference; with ties (duplicated or lattice
points) that changes the numbers, so the tests pin it. Distances are float64 and computed a
block of rows at a time, so memory is O(block * n), not O(n²).

:class:`SampleMetricError` and :func:`as_feature_pair` are shared by the sample-level metrics
(``metrics/kid``, ``metrics/fdd_interval``).
"""

from __future__ import annotations

import numpy as np

from cxrfactory.errors import UserError

__all__ = ["SampleMetricError", "as_feature_pair", "prdc"]

_BLOCK = 1024  # rows per distance block: 1024 x 5000 float64 is 40 MB


class SampleMetricError(UserError, ValueError):
    """Feature matrices a sample-level metric cannot use (shape, size, NaN or infinity)."""


def as_feature_pair(
    a: np.ndarray,
    b: np.ndarray,
    *,
    min_rows: int,
    why: str,
    names: tuple[str, str] = ("real", "fake"),
) -> tuple[np.ndarray, np.ndarray]:
    """float64 copies of two (n, d) feature matrices with the same d, finite, each with at
    least ``min_rows`` rows; ``why`` (what needs the rows) and ``names`` go in the messages."""
    pair = []
    for name, x in zip(names, (a, b)):
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise SampleMetricError(
                f"{name} features must be a (rows, dims) matrix, got shape {x.shape}"
            )
        if x.shape[0] < min_rows:
            raise SampleMetricError(
                f"{name} features have {x.shape[0]} rows; {why} needs at least {min_rows}"
            )
        if not np.isfinite(x).all():
            raise SampleMetricError(f"{name} features contain NaN or infinity")
        pair.append(x)
    if pair[0].shape[1] != pair[1].shape[1]:
        raise SampleMetricError(
            f"feature dimensions differ: {names[0]} has {pair[0].shape[1]}, "
            f"{names[1]} {pair[1].shape[1]}"
        )
    return pair[0], pair[1]


def _distances(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Euclidean distances by |a|² + |b|² - 2 a·b (one matrix product)."""
    squared = a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    # Rounding can leave a tiny negative where two points coincide.
    return np.sqrt(np.maximum(squared, 0.0))


def _radii(x: np.ndarray, x_sq: np.ndarray, k: int, block: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row: the (k+1)-th smallest of its
    distance row, whose smallest is the row itself."""
    radii = np.empty(x.shape[0])
    for start in range(0, x.shape[0], block):
        stop = min(start + block, x.shape[0])
        dist = _distances(x[start:stop], x, x_sq[start:stop], x_sq)
        # The self-distance is exactly 0 (as sklearn's pairwise_distances makes it in the
        # reference), not whatever rounding left of |x|² + |x|² - 2 x·x.
        rows = np.arange(stop - start)
        dist[rows, rows + start] = 0.0
        radii[start:stop] = np.partition(dist, k, axis=1)[:, k]
    return radii


def prdc(
    real: np.ndarray, fake: np.ndarray, *, k: int = 5, block: int = _BLOCK
) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` (m, d) against ``real`` (n, d)
    with k-nearest-neighbour balls; both sides need more than ``k`` rows.

    ``block`` is how many rows of distances are held at once; it changes memory, not results.
    """
    if k < 1:
        raise SampleMetricError(f"k must be at least 1, got {k}")
    if block < 1:
        raise SampleMetricError(f"block must be at least 1, got {block}")
    real, fake = as_feature_pair(real, fake, min_rows=k + 1, why=f"PRDC with k={k}")
    real_sq = np.einsum("ij,ij->i", real, real)
    fake_sq = np.einsum("ij,ij->i", fake, fake)
    real_radii = _radii(real, real_sq, k, block)
    fake_radii = _radii(fake, fake_sq, k, block)

    balls_holding_fake = np.zeros(fake.shape[0], dtype=np.int64)  # real balls around each fake
    real_in_fake_ball = np.zeros(real.shape[0], dtype=bool)
    nearest_fake = np.empty(real.shape[0])
    for start in range(0, real.shape[0], block):
        stop = min(start + block, real.shape[0])
        dist = _distances(real[start:stop], fake, real_sq[start:stop], fake_sq)  # (b, m)
        balls_holding_fake += (dist < real_radii[start:stop, None]).sum(axis=0)
        real_in_fake_ball[start:stop] = (dist < fake_radii[None, :]).any(axis=1)
        nearest_fake[start:stop] = dist.min(axis=1)

    return {
        "precision": float((balls_holding_fake > 0).mean()),
        "recall": float(real_in_fake_ball.mean()),
        "density": float(balls_holding_fake.mean() / k),
        "coverage": float((nearest_fake < real_radii).mean()),
    }

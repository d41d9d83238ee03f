"""Kernel Inception Distance: the unbiased squared MMD with a cubic polynomial kernel.

Bińkowski, Sutherland, Arbel and Gretton, "Demystifying MMD GANs", ICLR 2018. With
k(x, y) = (x·y / d + 1)³ and sets X (m rows), Y (n rows),

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (n(n-1))
             - 2 Σ_{i,j} k(x_i, y_j) / (mn)

which is unbiased, so it can be negative when the two sets come from one distribution. KID is
its mean over ``num_subsets`` random subsets of ``subset_size`` rows drawn without replacement
from each side, as torch-fidelity and clean-fid estimate it (the subset size is capped at the
smaller side, as clean-fid does). Computed in float64: the estimate is a small difference of
large kernel sums.
"""

from __future__ import annotations

import numpy as np

from cxrfactory.metrics.prdc import SampleMetricError, as_feature_pair

__all__ = ["kid", "mmd2_unbiased"]


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) polynomial kernel (a·b / d + 1)³."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy = _kernel(x, x), _kernel(y, y)
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))  # i ≠ j: drop k(x_i, x_i)
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * _kernel(x, y).sum() / (m * n))


def mmd2_unbiased(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD² between the whole sets ``real`` (m, d) and ``fake`` (n, d) under the KID
    kernel; each side needs at least 2 rows. For m = n it is torch-fidelity's ``mmd2``."""
    real, fake = as_feature_pair(real, fake, min_rows=2, why="the unbiased MMD²")
    return _mmd2(real, fake)


def kid(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float | int]:
    """KID between ``real`` (m, d) and ``fake`` (n, d): the mean of the unbiased MMD² over
    ``num_subsets`` pairs of subsets, each side drawn without replacement by a
    ``numpy.random.default_rng(seed)``, so a seed gives the same number every time.

    ``subset_size`` is capped at min(m, n); the size used is returned. ``kid_std`` is
    torch-fidelity's ``kernel_inception_distance_std``: the standard deviation (ddof 0) of the
    subset estimates, i.e. the spread of a KID measured at that subset size (its standard
    error as a single-subset estimate), not the standard error of the mean ``kid`` (that is
    smaller by about sqrt(num_subsets) for independent subsets, which overlapping subsets of
    a small set are not).
    """
    if num_subsets < 1:
        raise SampleMetricError(f"num_subsets must be at least 1, got {num_subsets}")
    if subset_size < 2:
        raise SampleMetricError(f"subset_size must be at least 2, got {subset_size}")
    real, fake = as_feature_pair(real, fake, min_rows=2, why="KID")
    size = min(subset_size, real.shape[0], fake.shape[0])
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for s in range(num_subsets):
        real_rows = rng.choice(real.shape[0], size, replace=False)
        fake_rows = rng.choice(fake.shape[0], size, replace=False)
        estimates[s] = _mmd2(real[real_rows], fake[fake_rows])
    return {
        "kid": float(estimates.mean()),
        "kid_std": float(estimates.std()),
        "subset_size": size,
        "num_subsets": num_subsets,
    }

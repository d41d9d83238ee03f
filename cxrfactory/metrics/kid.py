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

__all__ = ["jackknife_se", "kid", "mmd2_unbiased"]


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
    max_rows: int = 2000,
) -> dict[str, float | int | None]:
    """KID between ``real`` (m, d) and ``fake`` (n, d): the mean of the unbiased MMD² over
    ``num_subsets`` pairs of subsets, each side drawn without replacement by a
    ``numpy.random.default_rng(seed)``, so a seed gives the same number every time.

    ``subset_size`` is capped at min(m, n); the size used is returned. ``kid_std`` is
    torch-fidelity's ``kernel_inception_distance_std``: the standard deviation (ddof 0) of the
    subset estimates, i.e. the spread of a KID measured at that subset size (its standard
    error as a single-subset estimate), not the standard error of the mean ``kid`` (that is
    smaller by about sqrt(num_subsets) for independent subsets, which overlapping subsets of
    a small set are not). It is 0 when the subsets are the whole sets; ``kid_se``
    (:func:`jackknife_se`) is the standard error to read.
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
        "kid_se": jackknife_se(real, fake, max_rows=max_rows, seed=seed),
        "subset_size": size,
        "num_subsets": num_subsets,
    }


def jackknife_se(real: np.ndarray, fake: np.ndarray, *, max_rows: int = 2000, seed: int = 0) -> float | None:
    """Standard error of the unbiased MMD² of the whole sets: the two-sample delete-one
    jackknife (Arvesen 1969), var = (m-1)/m Σ_i (θ₍ᵢ₎ - θ̄)² + (n-1)/n Σ_j (θ₍ⱼ₎ - θ̄)², each
    θ₍ᵢ₎ the estimate without row i, all from the three kernel matrices' row sums in O(mn).

    Unlike the spread over subsets, it does not vanish when the subsets are the whole sets
    (FDD's equal counts of up to 1,000 per class). Sides above ``max_rows`` rows are
    subsampled (seeded) to bound the kernel matrices' memory. None below 3 rows a side.
    """
    real, fake = as_feature_pair(real, fake, min_rows=2, why="KID")
    rng = np.random.default_rng(seed)
    if real.shape[0] > max_rows:
        real = real[np.sort(rng.choice(real.shape[0], max_rows, replace=False))]
    if fake.shape[0] > max_rows:
        fake = fake[np.sort(rng.choice(fake.shape[0], max_rows, replace=False))]
    m, n = real.shape[0], fake.shape[0]
    if min(m, n) < 3:
        return None
    k_xx, k_yy, k_xy = _kernel(real, real), _kernel(fake, fake), _kernel(real, fake)
    row_x = k_xx.sum(axis=1) - np.diag(k_xx)  # Σ_{i'≠i} k(x_i, x_i')
    row_y = k_yy.sum(axis=1) - np.diag(k_yy)
    a, b, c = row_x.sum(), row_y.sum(), k_xy.sum()
    cross_x, cross_y = k_xy.sum(axis=1), k_xy.sum(axis=0)
    without_x = (a - 2 * row_x) / ((m - 1) * (m - 2)) + b / (n * (n - 1)) - 2 * (c - cross_x) / ((m - 1) * n)
    without_y = a / (m * (m - 1)) + (b - 2 * row_y) / ((n - 1) * (n - 2)) - 2 * (c - cross_y) / (m * (n - 1))
    var = ((m - 1) / m * np.sum((without_x - without_x.mean()) ** 2)
           + (n - 1) / n * np.sum((without_y - without_y.mean()) ** 2))
    return float(np.sqrt(var))

"""The Fréchet distance from feature matrices, and a bootstrap interval for its excess over
the real-vs-real floor.

The Fréchet distance (Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge
to a Local Nash Equilibrium", NeurIPS 2017; FDD when the features are a domain classifier's)
of finite samples is biased upwards, more so for fewer rows, so a number alone does not say
how far a generator is from the real data. Two halves of the real set give a floor: the
distance that sampling noise alone produces. The excess compares like with like, one real half
against the synthetic rows and against the other real half at equal sizes, and comes with a
bootstrap standard error and interval (Efron and Tibshirani, "An Introduction to the
Bootstrap", 1993, ch. 6 and 13) in which every replicate resamples rows within each set
independently.

Bootstrapping needs hundreds of distances, each from freshly resampled rows. With fewer
rows than dimensions (the usual case per class at d = 1024) there is a cheaper route than a
d × d covariance: for centred matrices X1c (n1, d), X2c (n2, d) and

    M = X1c X2cᵀ / sqrt((n1 - 1)(n2 - 1))        (n1, n2)

the nonzero eigenvalues of Σ1 Σ2 = X1cᵀ X1c X2cᵀ X2c / ((n1-1)(n2-1)) are those of Mᵀ M (a
cyclic permutation), so tr sqrt(Σ1 Σ2) is the sum of M's singular values (its nuclear norm),
and tr Σi = |Xic|²_F / (ni - 1). With more rows than dimensions on both sides the covariances
are smaller, and :func:`cxrfactory.metrics.frechet.frechet_distance` takes over.
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from cxrfactory.metrics.frechet import frechet_distance
from cxrfactory.metrics.prdc import SampleMetricError, as_feature_pair

__all__ = ["excess_over_floor", "frechet_from_features"]


def _frechet(x1: np.ndarray, x2: np.ndarray) -> float:
    """Squared Fréchet distance between the Gaussians fitted to two float64 (n, d) samples."""
    (n1, d), n2 = x1.shape, x2.shape[0]
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    if min(n1, n2) > d:
        return frechet_distance(mu1, np.cov(x1, rowvar=False), mu2, np.cov(x2, rowvar=False))
    c1, c2 = x1 - mu1, x2 - mu2
    cross = (c1 @ c2.T) / np.sqrt((n1 - 1) * (n2 - 1))  # (n1, n2)
    trace_sqrt = float(np.linalg.svd(cross, compute_uv=False).sum())
    diff = mu1 - mu2
    value = (float(diff @ diff) + float(np.einsum("ij,ij->", c1, c1)) / (n1 - 1)
             + float(np.einsum("ij,ij->", c2, c2)) / (n2 - 1) - 2.0 * trace_sqrt)
    # d² >= 0 exactly; a set compared with itself lands on ±rounding (as frechet_distance).
    return max(value, 0.0)


def frechet_from_features(x1: np.ndarray, x2: np.ndarray) -> float:
    """Squared Fréchet distance between the Gaussians fitted (mean, np.cov covariance) to
    ``x1`` (n1, d) and ``x2`` (n2, d); each needs at least 2 rows."""
    x1, x2 = as_feature_pair(x1, x2, min_rows=2, why="a covariance", names=("x1", "x2"))
    return _frechet(x1, x2)


def excess_over_floor(
    real: np.ndarray,
    fake: np.ndarray,
    real_halves: tuple[np.ndarray, np.ndarray],
    *,
    reps: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float | int | list[float] | None]:
    """FD(real, fake), the floor FD(half_a, half_b), the excess of synthetic over real at equal
    sizes, its bootstrap standard error and the ``level`` interval excess ± z·SE (``reps``
    replicates drawn by ``numpy.random.default_rng(seed)``).

    The excess is ``FD(half_a, fake_m) - FD(half_a, half_b_m)``: the same real half as the
    reference of both distances, and ``m`` = min(|half_b|, |fake|) rows on the other side of
    each, so the finite-sample bias of both terms is the same and a generator as good as the
    real data scores 0 in expectation (``fdd - floor`` would not: FD(real, fake) is measured at
    twice the floor's sample size, so its bias is smaller and the difference is negative even
    for real images). Each bootstrap replicate redraws half_a (its size), half_b and fake (m
    each) with replacement; an interval that excludes 0 from above means the synthetic images
    are told apart from new real patients' at this sample size.

    ``real_halves`` are two disjoint parts of the real set (patient halves). When either half
    has fewer than 2 rows there is no floor: ``floor``, ``excess`` and ``interval`` are None.
    """
    if reps < 1:
        raise SampleMetricError(f"reps must be at least 1, got {reps}")
    if not 0.0 < level < 1.0:
        raise SampleMetricError(f"level must lie strictly between 0 and 1, got {level}")
    real, fake = as_feature_pair(real, fake, min_rows=2, why="a covariance")
    fdd = _frechet(real, fake)
    half_a, half_b = (np.asarray(h, dtype=np.float64) for h in real_halves)
    result: dict[str, float | int | list[float] | None] = {
        "fdd": fdd, "floor": None, "excess": None, "se": None, "interval": None, "reps": reps, "m": None,
    }
    if min(len(half_a), len(half_b)) < 2:
        return result
    half_a, half_b = as_feature_pair(
        half_a, half_b, min_rows=2, why="a covariance", names=("half_a", "half_b")
    )
    if half_a.shape[1] != real.shape[1]:
        raise SampleMetricError(
            f"feature dimensions differ: real has {real.shape[1]}, its halves {half_a.shape[1]}"
        )
    floor = _frechet(half_a, half_b)
    m = min(len(half_b), len(fake))
    rng = np.random.default_rng(seed)
    # The point estimate: m rows of each second side, drawn without replacement.
    fake_m = fake[rng.permutation(len(fake))[:m]]
    b_m = half_b[rng.permutation(len(half_b))[:m]]
    excess = _frechet(half_a, fake_m) - _frechet(half_a, b_m)

    def draw(x: np.ndarray, size: int) -> np.ndarray:
        return x[rng.integers(0, x.shape[0], size=size)]

    excesses = np.empty(reps)
    for r in range(reps):
        # One draw per set per replicate, always in this order, so a seed fixes the interval.
        a_r, b_r, fake_r = draw(half_a, len(half_a)), draw(half_b, m), draw(fake, m)
        excesses[r] = _frechet(a_r, fake_r) - _frechet(a_r, b_r)
    # The standard bootstrap interval (estimate ± z·SE): the replicates' spread is right, but
    # their centre is not, since rows drawn twice bias a Fréchet distance upwards (the
    # percentile interval covered 0 for equal distributions in 13 of 40 trials at n < d; this
    # one in 40 of 40, BENCHMARKS.md "Sample-level metrics").
    se = float(np.std(excesses, ddof=1))
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    result.update(floor=floor, excess=excess, se=se, interval=[excess - z * se, excess + z * se], m=m)
    return result

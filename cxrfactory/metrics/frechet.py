"""Fréchet distance between two Gaussians, in float64, without ``scipy.linalg.sqrtm``.

    d² = |mu1 - mu2|² + tr Σ1 + tr Σ2 - 2 tr sqrt(Σ1 Σ2)

Σ1 Σ2 is not symmetric, which is why pytorch-fid needs a general (Schur) matrix square root.
Its eigenvalues, though, are those of the symmetric PSD matrix √Σ1 Σ2 √Σ1, so

    tr sqrt(Σ1 Σ2) = Σ_i sqrt(λ_i(√Σ1 Σ2 √Σ1))

needs one factorisation of Σ1 and one symmetric eigenvalue solve. Any factor B with
Σ1 = B Bᵀ serves: √Σ1 = B Q for an orthogonal Q, so √Σ1 Σ2 √Σ1 = Qᵀ (Bᵀ Σ2 B) Q has the
eigenvalues of Bᵀ Σ2 B and √Σ1 itself is never formed. B is the Cholesky factor when Σ1 is
positive definite (a third of the work of an eigendecomposition, and backward stable
whenever it completes), else V Λ^½ from ``eigh`` over the positive eigenvalues only, so a
reference of rank r < d works with r × r products. The factor depends on the reference side
alone, so :class:`FrechetReference` keeps it: comparing many candidates with one real-image
statistic costs two matrix products and one ``eigvalsh`` each.

Negative eigenvalues (rounding, or a rank-deficient covariance from fewer images than feature
dimensions) are clipped to zero, so the result stays finite and non-negative where pytorch-fid
would print a warning and retry with an offset or fail with an imaginary component.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = [
    "FrechetReference",
    "RankDeficientWarning",
    "check_sample_size",
    "frechet_distance",
    "prepare_reference",
]


class RankDeficientWarning(UserWarning):
    """A covariance estimated from too few images to be full rank."""


def check_sample_size(n: int, dim: int, *, label: str | None = None) -> bool:
    """Warn (:class:`RankDeficientWarning`) and return False when ``n`` images cannot give a
    full-rank ``dim × dim`` covariance.

    A sample covariance of ``n`` rows has rank at most ``n - 1``, so it is singular whenever
    ``n <= dim``; the distance is still defined, but it is dominated by estimation noise and not
    comparable with distances computed from more images.
    """
    if n > dim:
        return True
    who = f"class {label!r}" if label is not None else "a statistic"
    warnings.warn(
        f"{who} has {n} images for {dim} feature dimensions: its covariance has rank <= "
        f"{max(n - 1, 0)} < {dim}, so the Fréchet distance is biased and noisy; use more "
        f"than {dim} images per class for comparable numbers",
        RankDeficientWarning,
        stacklevel=2,
    )
    return False


def _as_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and finiteness, return float64 copies with a symmetrised ``sigma``."""
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(
            f"{name}: mean of shape {mu.shape} needs a covariance of shape "
            f"({mu.size}, {mu.size}), got {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mean or covariance contains NaN or infinity")
    # A covariance accumulated in floating point is symmetric only to rounding; eigh reads one
    # triangle, so symmetrise to make the result independent of which one.
    return mu, (sigma + sigma.T) * 0.5


@dataclass(frozen=True, eq=False)
class FrechetReference:
    """One side of the comparison (the real images), factorised once.

    Build with :func:`prepare_reference`; call :meth:`distance` for each candidate.
    """

    mu: np.ndarray  # (d,) float64 mean
    factor: np.ndarray  # (d, r) with factor @ factor.T = Σ1 (r = d unless Σ1 is singular)
    trace_sigma: float  # tr Σ1

    @property
    def dim(self) -> int:
        return self.mu.size

    def distance(self, mu2: np.ndarray, sigma2: np.ndarray) -> float:
        """Squared Fréchet distance between this Gaussian and ``N(mu2, sigma2)``."""
        mu2, sigma2 = _as_gaussian(mu2, sigma2, "candidate")
        if mu2.size != self.dim:
            raise ValueError(
                f"feature dimensions differ: reference has {self.dim}, candidate {mu2.size}"
            )
        product = self.factor.T @ (sigma2 @ self.factor)  # (r, r), symmetric PSD
        eigenvalues = np.linalg.eigvalsh((product + product.T) * 0.5)
        trace_sqrt = float(np.sqrt(np.clip(eigenvalues, 0.0, None)).sum())
        diff = self.mu - mu2
        value = float(diff @ diff) + self.trace_sigma + float(np.trace(sigma2)) - 2.0 * trace_sqrt
        # d² >= 0 exactly; a set compared with itself lands on ±rounding, not on a negative.
        return max(value, 0.0)


def prepare_reference(mu: np.ndarray, sigma: np.ndarray) -> FrechetReference:
    """Factorise the reference Gaussian ``N(mu, sigma)`` once for many :meth:`distance` calls."""
    mu, sigma = _as_gaussian(mu, sigma, "reference")
    return FrechetReference(mu=mu, factor=_psd_factor(sigma), trace_sigma=float(np.trace(sigma)))


def _psd_factor(sigma: np.ndarray) -> np.ndarray:
    """B (d, r) with B Bᵀ = sigma: Cholesky when it succeeds, else a clipped eigen-factor."""
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:  # singular (n <= d images) or indefinite by rounding
        pass
    eigenvalues, eigenvectors = np.linalg.eigh(sigma)
    # Dropping eigenvalues <= 0 clips what rounding left slightly negative in a PSD matrix
    # and lets a low-rank reference work in its rank.
    positive = eigenvalues > 0.0
    return eigenvectors[:, positive] * np.sqrt(eigenvalues[positive])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Squared Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    The same quantity as pytorch-fid's ``calculate_frechet_distance`` (FID, FDD), computed in
    float64 through the symmetric form; for many comparisons against one side use
    :func:`prepare_reference`.
    """
    return prepare_reference(mu1, sigma1).distance(mu2, sigma2)

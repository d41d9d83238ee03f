"""Fréchet distance: against pytorch-fid, closed forms, rank-deficient inputs and misuse."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
from pytorch_fid.fid_score import calculate_frechet_distance

from cxrfactory.metrics.frechet import (
    RankDeficientWarning,
    check_sample_size,
    frechet_distance,
    prepare_reference,
)


def _gaussian(rng: np.random.Generator, d: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of n correlated samples: SPD and well conditioned when n >> d."""
    mixing = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    x = rng.standard_normal((n, d)) @ mixing + rng.standard_normal(d)
    return x.mean(axis=0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_agrees_with_pytorch_fid(d: int) -> None:
    rng = np.random.default_rng(d)
    mu1, sigma1 = _gaussian(rng, d, 4 * d)
    mu2, sigma2 = _gaussian(rng, d, 4 * d)
    expected = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-6)
    # The distance is symmetric although the computation is not.
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-6)


def test_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, size=(2, 32))
    mu1, mu2 = rng.standard_normal((2, 32))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_degenerate_reference_closed_form() -> None:
    """All reference images alike (Σ1 = 0): d² = |mu1 - mu2|² + tr Σ2, from either side."""
    mu2, sigma2 = _gaussian(np.random.default_rng(6), 16, 100)
    expected = float(np.sum((1.0 - mu2) ** 2) + np.trace(sigma2))
    zeros = np.zeros((16, 16))
    assert frechet_distance(np.ones(16), zeros, mu2, sigma2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu2, sigma2, np.ones(16), zeros) == pytest.approx(expected, rel=1e-12)


def test_a_set_against_itself_is_zero() -> None:
    mu, sigma = _gaussian(np.random.default_rng(1), 128, 400)
    assert 0.0 <= frechet_distance(mu, sigma, mu, sigma) < 1e-9 * np.trace(sigma)


def test_reference_reuse_gives_the_same_numbers() -> None:
    rng = np.random.default_rng(2)
    mu1, sigma1 = _gaussian(rng, 64, 300)
    reference = prepare_reference(mu1, sigma1)
    np.testing.assert_allclose(reference.factor @ reference.factor.T, sigma1,
                               rtol=0, atol=1e-12 * np.abs(sigma1).max())
    for _ in range(3):
        mu2, sigma2 = _gaussian(rng, 64, 300)
        assert reference.distance(mu2, sigma2) == frechet_distance(mu1, sigma1, mu2, sigma2)


def _general_eig_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Independent reference: tr sqrt(Σ1 Σ2) from the general eigenvalues of Σ1 Σ2."""
    eigenvalues = scipy.linalg.eigvals(sigma1 @ sigma2).real
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


@pytest.mark.parametrize("n1, n2", [(20, 500), (500, 20), (10, 12), (96, 96), (97, 97)])
def test_rank_deficient_is_finite_non_negative_and_right(n1: int, n2: int) -> None:
    """n <= d (singular: the eigen-factor path, or Cholesky on rounding-positive pivots at
    n = d) and n = d + 1 (barely definite: Cholesky)."""
    rng = np.random.default_rng(n1 * 1000 + n2)
    d = 96
    mu1, sigma1 = _gaussian(rng, d, n1)
    mu2, sigma2 = _gaussian(rng, d, n2)
    assert np.linalg.matrix_rank(sigma1) == min(n1 - 1, d)
    value = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(value) and value >= 0.0
    assert value == pytest.approx(_general_eig_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)


def test_rank_deficient_edge_cases() -> None:
    rng = np.random.default_rng(3)
    d = 96
    # Tiny negative eigenvalues of a singular PSD matrix must not turn into NaN.
    mu, sigma = _gaussian(rng, d, 10)
    indefinite = sigma - 1e-12 * np.eye(d)
    value = frechet_distance(mu, indefinite, mu, indefinite)
    assert np.isfinite(value) and 0.0 <= value < 1e-9 * np.trace(sigma)


def test_sample_size_warning() -> None:
    with pytest.warns(RankDeficientWarning, match="class 'Nodule' has 100 images for 1024"):
        assert check_sample_size(100, 1024, label="Nodule") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_sample_size(1025, 1024) is True


def test_mismatched_or_invalid_inputs() -> None:
    mu, sigma = _gaussian(np.random.default_rng(5), 8, 50)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu, sigma[:4, :4], mu, sigma)
    bad = sigma.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, sigma, mu, bad)

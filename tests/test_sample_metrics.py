"""Sample-level metrics (PRDC, KID, Fréchet distance from features and its bootstrap interval)
against hand computations, independent O(n²) reimplementations and the covariance route."""

from __future__ import annotations

import numpy as np
import pytest

from cxrfactory.errors import UserError
from cxrfactory.metrics.fdd_interval import excess_over_floor, frechet_from_features
from cxrfactory.metrics.frechet import frechet_distance
from cxrfactory.metrics.kid import kid, mmd2_unbiased
from cxrfactory.metrics.prdc import SampleMetricError, prdc


def _gaussian(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


# PRDC -------------------------------------------------------------------------------------


def _prdc_reference(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """The clovaai formulas with distances from explicit differences and a full sort."""
    def dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))

    real_radii = np.sort(dist(real, real), axis=1)[:, k]
    fake_radii = np.sort(dist(fake, fake), axis=1)[:, k]
    rf = dist(real, fake)
    inside_real = rf < real_radii[:, None]
    return {
        "precision": inside_real.any(axis=0).mean(),
        "recall": (rf < fake_radii[None, :]).any(axis=1).mean(),
        "density": inside_real.sum(axis=0).mean() / k,
        "coverage": (rf.min(axis=1) < real_radii).mean(),
    }


def test_prdc_hand_example() -> None:
    # k = 2. Real radii (2nd neighbour): 0 -> 2, 1 -> 1, 2 -> 1, 3 -> 2.
    # Fake radii: 0.5 -> 9.5, 2.5 -> 7.5, 10 -> 9.5.
    # 0.5 lies in the balls of 0 and 1; 2.5 in those of 2 and 3; 10 in none.
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [2.5], [10.0]])
    got = prdc(real, fake, k=2)
    assert got["precision"] == pytest.approx(2 / 3, abs=1e-15)
    assert got["recall"] == 1.0
    assert got["density"] == pytest.approx((2 + 2 + 0) / 3 / 2, abs=1e-15)
    assert got["coverage"] == 1.0


def test_prdc_identical_sets() -> None:
    # Without ties each ball strictly holds its point and k - 1 neighbours: density is 1.
    points = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]])
    assert prdc(points, points, k=2) == {
        "precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0,
    }
    x = _gaussian(0, 50, 4)
    assert prdc(x, x, k=5)["density"] == pytest.approx(1.0, abs=1e-15)
    # On a lattice the strict `<` counts fewer: the end balls (radius 2) hold 2 points, the
    # inner ones (radius 1, two neighbours at 1) only their own: (2 + 1 + 1 + 2) / 4 / 2.
    lattice = np.array([[0.0], [1.0], [2.0], [3.0]])
    got = prdc(lattice, lattice, k=2)
    assert got["density"] == pytest.approx(0.75, abs=1e-15)
    assert (got["precision"], got["recall"], got["coverage"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.5])
def test_prdc_matches_reference(shift: float) -> None:
    real = _gaussian(1, 120, 6)
    fake = _gaussian(2, 90, 6, shift) * 1.3
    got = prdc(real, fake, k=5)
    want = _prdc_reference(real, fake, 5)
    assert got == pytest.approx(want, abs=1e-12)
    if shift == 1.5:  # the test must see more than the all-ones corner
        assert 0.0 < got["precision"] < 1.0 and 0.0 < got["coverage"] < 1.0


def test_prdc_far_fake_is_zero() -> None:
    got = prdc(_gaussian(3, 40, 3), _gaussian(4, 30, 3, shift=100.0), k=5)
    assert got == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_blocks_do_not_change_results() -> None:
    real, fake = _gaussian(5, 53, 5), _gaussian(6, 41, 5, shift=0.7)
    assert prdc(real, fake, k=3, block=7) == prdc(real, fake, k=3, block=10_000)


# KID --------------------------------------------------------------------------------------


def test_mmd2_unbiased_by_hand() -> None:
    x, y = _gaussian(7, 4, 3), _gaussian(8, 6, 3, shift=0.3)
    d = 3

    def kernel(a: np.ndarray, b: np.ndarray) -> float:
        return (float(a @ b) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_is_the_mean_over_seeded_subsets() -> None:
    real, fake = _gaussian(9, 30, 4), _gaussian(10, 25, 4, shift=0.2)
    got = kid(real, fake, num_subsets=7, subset_size=10, seed=3)
    rng = np.random.default_rng(3)
    estimates = []
    for _ in range(7):
        r = rng.choice(30, 10, replace=False)
        f = rng.choice(25, 10, replace=False)
        estimates.append(mmd2_unbiased(real[r], fake[f]))
    assert got["kid"] == pytest.approx(np.mean(estimates), rel=1e-12)
    assert got["kid_std"] == pytest.approx(np.std(estimates), rel=1e-12)
    assert (got["subset_size"], got["num_subsets"]) == (10, 7)


def test_kid_near_zero_for_one_distribution_and_positive_for_a_shift() -> None:
    real, same = _gaussian(11, 400, 16), _gaussian(12, 400, 16)
    null = kid(real, same, num_subsets=50, subset_size=200)
    assert abs(null["kid"]) < null["kid_std"]
    shifted = kid(real, _gaussian(13, 400, 16, shift=0.5), num_subsets=50, subset_size=200)
    assert shifted["kid"] > 5 * shifted["kid_std"] > 0


def test_kid_deterministic_by_seed() -> None:
    real, fake = _gaussian(14, 60, 5), _gaussian(15, 60, 5, shift=0.1)
    one = kid(real, fake, num_subsets=10, subset_size=20, seed=4)
    assert kid(real, fake, num_subsets=10, subset_size=20, seed=4) == one
    assert kid(real, fake, num_subsets=10, subset_size=20, seed=5)["kid"] != one["kid"]


def test_kid_caps_subset_size() -> None:
    real, fake = _gaussian(16, 50, 4), _gaussian(17, 30, 4)
    assert kid(real, fake, num_subsets=3)["subset_size"] == 30
    # Subsets as large as both sets are the whole sets, in some order: every subset gives
    # the whole-set estimate.
    got = kid(real[:30], fake, num_subsets=3)
    assert got["kid"] == pytest.approx(mmd2_unbiased(real[:30], fake), rel=1e-10)
    assert got["kid_std"] == pytest.approx(0.0, abs=1e-12)


# Fréchet distance from features -----------------------------------------------------------


@pytest.mark.parametrize(("n1", "n2", "d"), [(40, 60, 100), (30, 500, 64), (300, 200, 16)])
def test_frechet_from_features_matches_covariance_route(n1: int, n2: int, d: int) -> None:
    mixing = np.eye(d) + np.random.default_rng(18).standard_normal((d, d)) / np.sqrt(d)
    x1 = _gaussian(19, n1, d) @ mixing
    x2 = _gaussian(20, n2, d, shift=0.2) * 1.1
    want = frechet_distance(
        x1.mean(axis=0), np.cov(x1, rowvar=False), x2.mean(axis=0), np.cov(x2, rowvar=False)
    )
    assert frechet_from_features(x1, x2) == pytest.approx(want, rel=1e-6)


def test_frechet_from_features_of_one_set_is_zero() -> None:
    x = _gaussian(21, 20, 50)
    assert frechet_from_features(x, x) == pytest.approx(0.0, abs=1e-9)


def _real_and_halves(n: int, d: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    real = _gaussian(22, n, d)
    return real, (real[: n // 2], real[n // 2 :])


def test_excess_interval_contains_estimate_for_a_mild_shift() -> None:
    real, halves = _real_and_halves(400, 8)
    got = excess_over_floor(real, _gaussian(23, 300, 8, shift=0.1), halves, reps=100, seed=1)
    low, high = got["interval"]
    assert low < got["excess"] < high
    assert (low + high) / 2 == pytest.approx(got["excess"]) and high - low == pytest.approx(2 * 1.959964 * got["se"])
    assert got["reps"] == 100 and got["m"] == 200  # the smaller of half_b (200) and the fake set


def test_excess_is_unbiased_and_its_interval_covers_zero_for_real_like_images() -> None:
    """Synthetic rows from the real distribution: the excess compares equal sizes, so it
    centres on 0 (``fdd - floor`` would sit far below it), and the 95% interval holds 0 in
    about 95% of draws, also with fewer rows than dimensions."""
    covered, excesses = 0, []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        real, fake = rng.normal(size=(100, 64)), rng.normal(size=(200, 64))
        got = excess_over_floor(real, fake, (real[:50], real[50:]), reps=60, seed=seed)
        low, high = got["interval"]
        covered += low <= 0.0 <= high
        excesses.append(got["excess"])
        assert got["fdd"] - got["floor"] < 0  # the naive difference is biased below 0
    assert covered >= 17
    assert abs(np.mean(excesses)) < 2 * np.std(excesses) / np.sqrt(len(excesses)) + 0.5


def test_excess_interval_excludes_zero_for_a_large_shift() -> None:
    real, halves = _real_and_halves(400, 8)
    got = excess_over_floor(real, _gaussian(24, 300, 8, shift=1.0), halves, reps=100, seed=1)
    assert got["interval"][0] > 0.0
    assert got["fdd"] > got["floor"] > 0.0


def test_excess_interval_deterministic_and_without_halves() -> None:
    real, halves = _real_and_halves(60, 10)
    fake = _gaussian(25, 50, 10, shift=0.3)
    one = excess_over_floor(real, fake, halves, reps=20, seed=7)
    assert excess_over_floor(real, fake, halves, reps=20, seed=7) == one
    assert excess_over_floor(real, fake, halves, reps=20, seed=8)["interval"] != one["interval"]
    none = excess_over_floor(real, fake, (real[:1], real[1:]), reps=20)
    assert none == {"fdd": one["fdd"], "floor": None, "excess": None, "se": None, "interval": None,
                    "reps": 20, "m": None}


# Misuse -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: prdc(np.zeros((10, 3)), np.zeros((10, 4))),
        lambda: prdc(np.zeros((5, 3)), np.ones((10, 3)), k=5),  # needs k + 1 rows
        lambda: prdc(np.zeros((10, 3)), np.full((10, 3), np.nan)),
        lambda: prdc(np.zeros(10), np.zeros(10)),
        lambda: kid(np.zeros((10, 3)), np.zeros((10, 4))),
        lambda: kid(np.zeros((1, 3)), np.zeros((10, 3))),
        lambda: mmd2_unbiased(np.zeros((10, 3)), np.array([[0.0, np.inf, 0.0]] * 3)),
        lambda: frechet_from_features(np.zeros((10, 3)), np.zeros((10, 4))),
        lambda: frechet_from_features(np.zeros((1, 3)), np.zeros((10, 3))),
        lambda: excess_over_floor(np.ones((10, 3)), np.ones((10, 3)),
                                  (np.ones((5, 4)), np.ones((5, 4)))),
    ],
)
def test_misuse_is_a_user_error(call) -> None:
    with pytest.raises(SampleMetricError) as caught:
        call()
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)


def test_kid_jackknife_se_matches_brute_force_and_the_spread_of_repeated_draws() -> None:
    from cxrfactory.metrics.kid import jackknife_se

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(9, 4)), rng.normal(size=(7, 4)) + 0.2
    # brute force: recompute the estimate with each row left out
    without_x = [mmd2_unbiased(np.delete(x, i, 0), y) for i in range(len(x))]
    without_y = [mmd2_unbiased(x, np.delete(y, j, 0)) for j in range(len(y))]
    var = (8 / 9 * np.sum((np.array(without_x) - np.mean(without_x)) ** 2)
           + 6 / 7 * np.sum((np.array(without_y) - np.mean(without_y)) ** 2))
    assert jackknife_se(x, y) == pytest.approx(np.sqrt(var), rel=1e-9)
    # It estimates the spread of the estimate over fresh draws of the same sizes ...
    draws, ses = [], []
    for seed in range(60):
        r = np.random.default_rng(1000 + seed)
        a, b = r.normal(size=(60, 8)), r.normal(size=(60, 8)) + 0.3
        draws.append(mmd2_unbiased(a, b))
        ses.append(jackknife_se(a, b))
    assert 0.7 < np.mean(ses) / np.std(draws) < 1.4
    # ... and, unlike the subset spread, does not vanish when the subsets are the whole sets.
    got = kid(x[:7], y, subset_size=1000)  # equal sizes: every subset is the whole set
    assert got["kid_std"] < 1e-12 < got["kid_se"]
    assert jackknife_se(x[:2], y) is None

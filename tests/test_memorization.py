"""The memorization audit's core: exact nearest-neighbour search (metrics/nearest.py) against a
float64 NumPy brute force, and the rule (metrics/memorization.py) on planted copies."""

from __future__ import annotations

import numpy as np
import pytest

from cxrfactory.errors import UserError
from cxrfactory.metrics.memorization import (
    SUMMARY_KEYS,
    AuditRule,
    MemorizationError,
    distance_summary,
    false_flag_rate,
    flag,
    thresholds,
)
from cxrfactory.metrics.nearest import (
    NearestError,
    NearestIndex,
    normalize_features,
    thumbnail_vectors,
)


def brute_force(queries: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The independent reference: every pairwise distance in float64, then argmin."""
    diff = queries.astype(np.float64)[:, None, :] - reference.astype(np.float64)[None, :, :]
    dist = np.sqrt(np.square(diff).sum(axis=2))
    index = dist.argmin(axis=1)
    return dist[np.arange(len(queries)), index], index


# Nearest-neighbour search.

def test_verbatim_copies_are_found_at_distance_zero() -> None:
    rng = np.random.default_rng(0)
    # Far from the origin with large norms: the float32 expansion alone would not give 0.
    reference = (rng.standard_normal((400, 32)) * 3 + 50).astype(np.float32)
    planted = rng.permutation(400)[:50]
    dist, index = NearestIndex(reference).search(reference[planted], block_rows=16, block_ref=100)
    assert dist.dtype == np.float64 and index.dtype == np.int64
    np.testing.assert_array_equal(index, planted)
    np.testing.assert_array_equal(dist, 0.0)


def test_verbatim_thumbnail_copies_are_found_at_distance_zero() -> None:
    rng = np.random.default_rng(1)
    thumbs = rng.integers(0, 256, size=(300, 32, 32), dtype=np.uint8)
    vectors = thumbnail_vectors(thumbs)
    planted = np.array([0, 17, 299, 150])
    dist, index = NearestIndex(vectors).search(thumbnail_vectors(thumbs[planted]))
    np.testing.assert_array_equal(index, planted)
    np.testing.assert_array_equal(dist, 0.0)


def test_lightly_perturbed_copies_find_their_original() -> None:
    rng = np.random.default_rng(2)
    reference = normalize_features(rng.standard_normal((500, 64)))
    planted = rng.permutation(500)[:40]
    # Noise of norm ~0.08, against ~1.1 between random unit vectors in 64 dimensions.
    queries = reference[planted] + 0.01 * rng.standard_normal((40, 64)).astype(np.float32)
    dist, index = NearestIndex(reference).search(queries, block_rows=16, block_ref=128)
    np.testing.assert_array_equal(index, planted)
    expected, _ = brute_force(queries, reference)
    np.testing.assert_allclose(dist, expected, rtol=1e-6, atol=1e-6)
    assert (dist > 0).all() and (dist < 0.2).all()


# Small sizes: every block is a few torch calls, and tiny blocks make many of them.
@pytest.mark.parametrize("block_rows, block_ref", [(3, 7), (1, 13), (17, 1000), (4096, 8192)])
def test_blocked_search_agrees_with_brute_force(block_rows: int, block_ref: int) -> None:
    rng = np.random.default_rng(3)
    reference = rng.standard_normal((61, 24)).astype(np.float32)
    queries = rng.standard_normal((25, 24))  # float64 queries are taken as float32
    dist, index = NearestIndex(reference).search(queries, block_rows=block_rows,
                                                 block_ref=block_ref)
    expected_dist, expected_index = brute_force(queries.astype(np.float32), reference)
    np.testing.assert_array_equal(index, expected_index)
    np.testing.assert_allclose(dist, expected_dist, rtol=1e-6)


def test_search_blocks_is_lazy_and_matches_one_search() -> None:
    rng = np.random.default_rng(4)
    reference = rng.standard_normal((120, 8)).astype(np.float32)
    blocks = [rng.standard_normal((n, 8)).astype(np.float32) for n in (10, 0, 33, 1)]
    index = NearestIndex(reference)
    pulled = []

    def stream():
        for block in blocks:
            pulled.append(len(block))
            yield block

    results = index.search_blocks(stream(), block_rows=4)
    first = next(results)
    assert pulled == [10] and len(first[0]) == 10  # one block read, not the whole stream
    rest = list(results)
    assert [len(d) for d, _ in rest] == [0, 33, 1]
    whole_dist, whole_index = index.search(np.concatenate(blocks))
    np.testing.assert_array_equal(np.concatenate([first[1], *(i for _, i in rest)]), whole_index)
    np.testing.assert_allclose(np.concatenate([first[0], *(d for d, _ in rest)]), whole_dist)


def test_normalize_features_and_thumbnail_vectors() -> None:
    rng = np.random.default_rng(5)
    x = rng.random((20, 16)) + 0.1
    unit = normalize_features(x)
    assert unit.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(normalize_features(37.0 * x), unit, rtol=1e-6)  # scale-free
    thumbs = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    vectors = thumbnail_vectors(thumbs)
    assert vectors.dtype == np.float32 and vectors.shape == (1, 4)
    np.testing.assert_allclose(vectors, [[0.0, 1.0, 0.2, 0.4]], rtol=1e-6)
    np.testing.assert_array_equal(thumbnail_vectors(thumbs.reshape(1, 4)), vectors)


def test_search_input_errors() -> None:
    assert issubclass(NearestError, UserError) and issubclass(NearestError, ValueError)
    index = NearestIndex(np.eye(4, dtype=np.float32))
    with pytest.raises(NearestError, match="dimension 3"):
        index.search(np.zeros((2, 3)))
    with pytest.raises(NearestError, match="NaN"):
        index.search(np.full((1, 4), np.nan))
    with pytest.raises(NearestError, match="2-D"):
        index.search(np.zeros(4))
    with pytest.raises(NearestError, match="block sizes"):
        index.search(np.zeros((1, 4)), block_rows=0)
    with pytest.raises(NearestError, match="empty"):
        NearestIndex(np.zeros((0, 4)))
    with pytest.raises(NearestError, match="all zero"):
        normalize_features(np.zeros((2, 4)))
    with pytest.raises(NearestError, match="uint8"):
        thumbnail_vectors(np.zeros((2, 4), dtype=np.float32))


# The rule.

def _draw(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """n images: a unit feature vector and, independently, a pixel vector in [0, 1]."""
    return {"feature": normalize_features(rng.standard_normal((n, 16))),
            "pixel": rng.random((n, 12), dtype=np.float32)}


def test_rule_flags_planted_copies_and_cross_fits_its_false_flag_rate() -> None:
    rng = np.random.default_rng(6)
    train, held, fresh = _draw(rng, 3000), _draw(rng, 2000), _draw(rng, 300)
    # 20 verbatim copies; 20 copies in feature space only (pixels new: a copied anatomy under
    # new contrast); 20 in pixel space only (features new); noise well inside 1% of neighbours.
    which = rng.permutation(3000)[:60]
    synthetic = {s: np.concatenate([train[s][which[:20]], train[s][which[20:40]] if s == "feature"
                                    else fresh[s][:20], train[s][which[40:]] if s == "pixel"
                                    else fresh[s][20:40], fresh[s][40:]]) for s in train}
    synthetic["feature"][20:40] += 0.003 * rng.standard_normal((20, 16)).astype(np.float32)
    synthetic["pixel"][40:60] += 0.003 * rng.standard_normal((20, 12)).astype(np.float32)
    indexes = {s: NearestIndex(train[s]) for s in train}
    held_dist = {s: indexes[s].search(held[s])[0] for s in train}
    found = {s: indexes[s].search(synthetic[s]) for s in train}
    np.testing.assert_array_equal(found["feature"][1][:40], which[:40])
    np.testing.assert_array_equal(found["pixel"][1][:20], which[:20])
    np.testing.assert_array_equal(found["pixel"][1][40:60], which[40:])

    rule = AuditRule()
    limits = thresholds(rule, held_dist)
    assert limits == {s: float(np.percentile(held_dist[s], 1.0)) for s in rule.spaces}
    flagged = flag(rule, limits, {s: d for s, (d, _) in found.items()})
    assert flagged[:60].all()
    # Each single-space copy is caught by its own space only: the union is what flags it.
    for s, planted in (("feature", slice(20, 40)), ("pixel", slice(40, 60))):
        only = AuditRule(spaces=(s,))
        assert flag(only, limits, {s: found[s][0]})[planted].all()
        other = AuditRule(spaces=({"feature": "pixel", "pixel": "feature"}[s],))
        assert flag(other, limits, {o: found[o][0] for o in other.spaces})[planted].sum() <= 2

    # Held-out draws are fresh, so the cross-fitted rate estimates the union's false-flag
    # rate, 1 - 0.99² ≈ 2% for two independent spaces; with 1000 images a fold its standard
    # error is about 0.5 points, so 1.5 points is a 3-sigma bound.
    rate = false_flag_rate(rule, held_dist, rng.random(2000) < 0.5)
    assert rate is not None and abs(rate - 0.0199) < 0.015
    # Fresh synthetic images behave like new patients: flagged about as often.
    assert flagged[60:].mean() < 0.06


def test_false_flag_rate_is_close_to_the_percentile_and_grows_with_the_union() -> None:
    rng = np.random.default_rng(7)
    n = 40_000
    fold = rng.random(n) < 0.5
    feature = rng.gamma(4.0, 0.1, size=n)
    held = {"feature": feature, "pixel": rng.gamma(9.0, 2.0, size=n)}
    # 20,000 a fold: the standard error of each rate is ~0.1 point; bounds are 4-5 sigma.
    single = false_flag_rate(AuditRule(percentile=1.0, spaces=("feature",)), held, fold)
    assert single is not None and abs(single - 0.01) < 0.004
    union = false_flag_rate(AuditRule(percentile=1.0), held, fold)
    assert union is not None and abs(union - (1 - 0.99 ** 2)) < 0.005
    # Two spaces that always agree flag no more than one.
    same = false_flag_rate(AuditRule(percentile=1.0), {"feature": feature, "pixel": feature}, fold)
    assert same == single
    wider = false_flag_rate(AuditRule(percentile=5.0, spaces=("feature",)), held, fold)
    assert wider is not None and abs(wider - 0.05) < 0.008


def test_false_flag_rate_is_cross_fitted_not_in_sample() -> None:
    # By hand: fold A = 1..5, fold B = 6..10, 10th percentile (linear): A -> 1.4, B -> 6.4.
    # A's threshold flags none of B; B's flags all of A: (0 + 1) / 2. In-sample it would be 0.1.
    held = {"feature": np.arange(1.0, 11.0)}
    fold = np.arange(10) < 5
    rule = AuditRule(percentile=10.0, spaces=("feature",))
    assert false_flag_rate(rule, held, fold) == 0.5
    assert false_flag_rate(rule, held, np.ones(10, dtype=bool)) is None
    assert false_flag_rate(rule, held, np.zeros(10, dtype=bool)) is None


def test_flag_is_strict_and_per_space() -> None:
    rule = AuditRule()
    limits = {"feature": 0.5, "pixel": 2.0}
    flagged = flag(rule, limits, {"feature": np.array([0.4, 0.5, 0.9, 0.9]),
                                  "pixel": np.array([3.0, 3.0, 1.0, 2.0])})
    np.testing.assert_array_equal(flagged, [True, False, True, False])
    assert flag(rule, limits, {"feature": np.zeros(0), "pixel": np.zeros(0)}).shape == (0,)


def test_distance_summary() -> None:
    d = np.random.default_rng(8).random(1000)
    summary = distance_summary(d)
    assert list(summary) == list(SUMMARY_KEYS)
    assert summary["n"] == 1000 and summary["min"] == d.min() and summary["mean"] == d.mean()
    assert summary["p5"] == np.percentile(d, 5) and summary["median"] == np.median(d)
    assert all(type(v) is float for k, v in summary.items() if k != "n")
    empty = distance_summary(np.zeros(0))
    assert list(empty) == list(SUMMARY_KEYS) and empty["n"] == 0
    assert all(v is None for k, v in empty.items() if k != "n")


@pytest.mark.parametrize("percentile", [0, 50, -1.0, float("nan"), True, "1"])
def test_rule_refuses_bad_percentiles(percentile: object) -> None:
    with pytest.raises(MemorizationError, match="percentile"):
        AuditRule(percentile=percentile)  # type: ignore[arg-type]


def test_rule_input_errors() -> None:
    assert issubclass(MemorizationError, UserError) and issubclass(MemorizationError, ValueError)
    for spaces in [(), ("feature", "feature"), ("feature", "")]:
        with pytest.raises(MemorizationError, match="space"):
            AuditRule(spaces=spaces)
    assert AuditRule(spaces=["pixel"]).spaces == ("pixel",)  # type: ignore[arg-type]
    rule = AuditRule()
    good = {"feature": np.ones(4), "pixel": np.ones(4)}
    with pytest.raises(MemorizationError, match="empty"):
        thresholds(rule, {"feature": np.zeros(0), "pixel": np.zeros(0)})
    with pytest.raises(MemorizationError, match="lengths differ"):
        thresholds(rule, {"feature": np.ones(4), "pixel": np.ones(3)})
    with pytest.raises(MemorizationError, match="lacks the space"):
        thresholds(rule, {"feature": np.ones(4)})
    with pytest.raises(MemorizationError, match="negative"):
        thresholds(rule, {"feature": -np.ones(4), "pixel": np.ones(4)})
    with pytest.raises(MemorizationError, match="no threshold"):
        flag(rule, {"feature": 1.0}, good)
    with pytest.raises(MemorizationError, match="lengths differ"):
        flag(rule, {"feature": 1.0, "pixel": 1.0}, {"feature": np.ones(4), "pixel": np.ones(5)})
    with pytest.raises(MemorizationError, match="fold"):
        false_flag_rate(rule, good, np.ones(3, dtype=bool))
    with pytest.raises(MemorizationError, match="fold"):
        false_flag_rate(rule, good, np.array([0, 1, 0, 1]))

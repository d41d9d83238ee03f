"""FeatureStats: exact streaming/merged per-class mean and covariance, batches and .npz files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrfactory.storage import StorageError
from cxrfactory.metrics.stats import FeatureStats

CLASSES = ("Normal", "Effusion", "Mass")


def _features(seed: int, n: int = 120, d: int = 6, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d))
    x = rng.standard_normal((n, d)) @ mixing + offset + rng.standard_normal(d)
    labels = rng.choice(CLASSES, size=n)
    return x, labels


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _assert_matches_numpy(stats: FeatureStats, x: np.ndarray, labels: np.ndarray) -> None:
    for label in CLASSES:
        rows = x[labels == label]
        assert stats.count(label) == len(rows)
        mu, sigma = stats.mean_cov(label)
        assert _relative(mu, rows.mean(axis=0)) < 1e-10
        assert _relative(sigma, np.cov(rows, rowvar=False)) < 1e-10
        np.testing.assert_array_equal(sigma, sigma.T)


def _split_points(kind: str, n: int, rng: np.random.Generator) -> list[int]:
    if kind == "whole":
        return [0, n]
    if kind == "random":
        return [0, *sorted(rng.choice(np.arange(1, n), size=7, replace=False).tolist()), n]
    if kind == "single_rows":
        return list(range(n + 1))
    if kind == "with_empty_parts":
        return [0, 0, 10, 10, 10, 57, n, n]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["whole", "random", "single_rows", "with_empty_parts"])
@pytest.mark.parametrize("combine", ["update_stream", "merge_parts"])
def test_any_partitioning_equals_numpy(kind: str, combine: str) -> None:
    x, labels = _features(seed=1)
    cuts = _split_points(kind, len(x), np.random.default_rng(2))
    parts = [(x[a:b], labels[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    if combine == "update_stream":
        stats = FeatureStats()
        for features, names in parts:
            stats.update(features, names)
    else:
        singles = []
        for features, names in parts:
            part = FeatureStats()
            part.update(features, names)
            singles.append(part)
        # Merge in a shuffled order, a third as a chain and the rest as a balanced tree:
        # exactness must not depend on the grouping.
        order = np.random.default_rng(3).permutation(len(singles))
        chain = sum(singles[i] for i in order[: len(order) // 3])  # 0 when empty: __radd__
        stats = chain + _tree([singles[i] for i in order[len(order) // 3:]])
    _assert_matches_numpy(stats, x, labels)


def _tree(parts: list[FeatureStats]) -> FeatureStats:
    """Merge pairwise, level by level (a balanced tree, as Ray Data's reductions do)."""
    while len(parts) > 1:
        parts = [a + b for a, b in zip(parts[::2], parts[1::2])] + parts[len(parts) // 2 * 2:]
    return parts[0]


def test_large_mean_keeps_precision() -> None:
    """Features far from the origin next to their spread: raw sums would lose the covariance."""
    x, labels = _features(seed=4, n=400, offset=1e5)
    rows = x[labels == "Mass"]
    # The test data must really defeat a naive raw-sum accumulator, or the test proves nothing.
    n, s, outer = len(rows), rows.sum(axis=0), rows.T @ rows
    naive = (outer - np.outer(s, s) / n) / (n - 1)
    assert _relative(naive, np.cov(rows, rowvar=False)) > 1e-9

    parts = []
    for chunk in np.array_split(np.arange(len(x)), 9):
        part = FeatureStats()
        part.update(x[chunk], labels[chunk])
        parts.append(part)
    _assert_matches_numpy(sum(parts), x, labels)


def test_torch_float32_input_and_counts() -> None:
    x, labels = _features(seed=5, n=40)
    stats = FeatureStats()
    stats.update(torch.from_numpy(x.astype(np.float32)), list(labels))
    assert stats.dim == 6
    assert set(stats.labels) == set(labels)
    assert stats.count("Pneumonia") == 0
    mu, _ = stats.mean_cov("Normal")
    expected = x.astype(np.float32).astype(np.float64)[labels == "Normal"].mean(axis=0)
    assert _relative(mu, expected) < 1e-12


def test_merge_leaves_inputs_unchanged() -> None:
    x, labels = _features(seed=6)
    a, b = FeatureStats(), FeatureStats()
    a.update(x[:50], labels[:50])
    b.update(x[50:], labels[50:])
    before = a.to_arrays()
    _ = a + b
    after = a.to_arrays()
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


def test_dimension_mismatch_is_a_clear_error() -> None:
    stats = FeatureStats()
    stats.update(np.zeros((3, 4)), ["Normal"] * 3)
    with pytest.raises(ValueError, match="dimension 5"):
        stats.update(np.zeros((2, 5)), ["Normal"] * 2)
    other = FeatureStats()
    other.update(np.zeros((2, 5)), ["Normal"] * 2)
    with pytest.raises(ValueError, match="dimension 4 and 5"):
        stats.merge(other)
    with pytest.raises(ValueError, match="dimension"):
        FeatureStats(dim=8).update(np.zeros((1, 4)), ["Normal"])
    with pytest.raises(ValueError, match="3 feature rows but 2 labels"):
        stats.update(np.zeros((3, 4)), ["Normal"] * 2)
    with pytest.raises(ValueError, match="2-D"):
        stats.update(np.zeros(4), ["Normal"])


def test_mean_cov_errors() -> None:
    stats = FeatureStats()
    stats.update(np.ones((1, 3)), ["Mass"])
    with pytest.raises(ValueError, match="covariance needs 2"):
        stats.mean_cov("Mass")
    with pytest.raises(ValueError, match="no features for class 'Nodule'"):
        stats.mean_cov("Nodule")


def test_arrays_round_trip_as_ray_batches() -> None:
    """Partial stats per block become rows; concatenated rows (repeated labels) recombine."""
    x, labels = _features(seed=7)
    blocks = [FeatureStats() for _ in range(3)]
    for block, chunk in zip(blocks, np.array_split(np.arange(len(x)), 3)):
        block.update(x[chunk], labels[chunk])
    batches = [block.to_arrays() for block in blocks]
    assert batches[0]["outer"].shape == (len(blocks[0].labels), 6, 6)
    concatenated = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    _assert_matches_numpy(FeatureStats.from_arrays(concatenated), x, labels)

    # Ray may hand tensor columns back as object arrays of per-row arrays.
    as_objects = dict(concatenated)
    for key in ("shift", "sum", "outer"):
        column = np.empty(len(concatenated[key]), dtype=object)
        column[:] = list(concatenated[key])
        as_objects[key] = column
    _assert_matches_numpy(FeatureStats.from_arrays(as_objects), x, labels)

    empty = FeatureStats().to_arrays()
    assert FeatureStats.from_arrays(empty).labels == ()
    with pytest.raises(ValueError, match="lacks column"):
        FeatureStats.from_arrays({"label": np.array(["Normal"])})


def test_npz_round_trip_with_metadata(tmp_path) -> None:
    x, labels = _features(seed=8)
    stats = FeatureStats(meta={"split": "train"})
    stats.update(x, labels)
    path = tmp_path / "cache" / "real.npz"
    preprocessing = {"resolution": 224, "mean": 0.449, "std": 0.226, "grayscale": True}
    stats.save(path, classifier_sha256="ab" * 32, preprocessing=preprocessing)
    assert [p.name for p in path.parent.iterdir()] == ["real.npz"]  # no temporary left over

    loaded = FeatureStats.load(path)
    assert loaded.meta == {"split": "train", "classifier_sha256": "ab" * 32,
                           "preprocessing": preprocessing}
    assert loaded.dim == stats.dim and loaded.labels == stats.labels
    for label in CLASSES:
        for mine, theirs in zip(stats.mean_cov(label), loaded.mean_cov(label)):
            np.testing.assert_array_equal(mine, theirs)

    empty_path = tmp_path / "empty.npz"
    FeatureStats(dim=12).save(empty_path)
    assert FeatureStats.load(empty_path).dim == 12


def test_npz_errors(tmp_path) -> None:
    with pytest.raises(StorageError, match="missing.npz"):
        FeatureStats.load(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="corrupt.npz"):
        FeatureStats.load(corrupt)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        FeatureStats().save(tmp_path / "x.npz", weird=object())
    assert not (tmp_path / "x.npz").exists()


def test_merge_refuses_conflicting_provenance() -> None:
    a = FeatureStats(meta={"classifier_sha256": "a"})
    b = FeatureStats(meta={"classifier_sha256": "b"})
    with pytest.raises(ValueError, match="classifier_sha256"):
        a.merge(b)
    assert (a + FeatureStats(meta={"split": "val"})).meta == {"classifier_sha256": "a",
                                                              "split": "val"}

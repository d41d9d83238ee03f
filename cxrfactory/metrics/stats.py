"""Per-class feature statistics that stream, merge exactly and cache as ``.npz``.

Per class the accumulator keeps ``n``, the float64 sum and the float64 sum of outer products of
the features, memory O(d²) per class whatever the number of images. Two accumulators merge by
addition, so a Ray Data pipeline can reduce partial statistics per block, per worker and per
shard in any order and grouping.

Why a shift: the covariance is ``(outer - sum sumᵀ / n) / (n - 1)``. With raw features, when the
mean is large next to the spread (post-ReLU DenseNet features are all positive), the two terms
nearly cancel and float64 loses the digits the covariance lives in. Each class therefore
accumulates ``x - shift`` around a shift taken from its first batch's mean (close to the final
mean). Merging re-centres both sides on the merged mean before adding, which is exact in real
arithmetic (it is Chan et al.'s pairwise update written for sums) and keeps the cancellation
small whatever the partitioning.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cxrfactory.storage import StorageError, resolve

__all__ = ["FeatureStats"]

#: Version of the ``.npz`` layout written by :meth:`FeatureStats.save`.
NPZ_FORMAT = 1


@dataclass
class _ClassSums:
    """One class's sums around ``shift``: Σ(x - shift) and Σ(x - shift)(x - shift)ᵀ."""

    n: int
    shift: np.ndarray  # (d,) float64
    sum: np.ndarray  # (d,) float64
    outer: np.ndarray  # (d, d) float64

    def mean(self) -> np.ndarray:
        return self.shift + self.sum / self.n

    def recentred(self, new_shift: np.ndarray) -> _ClassSums:
        """The same sums expressed around ``new_shift`` (exact: a rank-2 correction)."""
        delta = self.shift - new_shift  # x - new = (x - shift) + delta
        s = self.sum
        cross = np.outer(delta, s)
        outer = self.outer + cross + cross.T + self.n * np.outer(delta, delta)
        return _ClassSums(self.n, new_shift.copy(), s + self.n * delta, outer)

    def merged(self, other: _ClassSums) -> _ClassSums:
        n = self.n + other.n
        # Re-centre both on the merged mean so the sums stay small next to the outer products.
        centre = (self.n * self.mean() + other.n * other.mean()) / n
        a, b = self.recentred(centre), other.recentred(centre)
        return _ClassSums(n, centre, a.sum + b.sum, a.outer + b.outer)

    def copy(self) -> _ClassSums:
        return _ClassSums(self.n, self.shift.copy(), self.sum.copy(), self.outer.copy())


def _as_features(features: Any) -> np.ndarray:
    """A (N, d) float64 array from a NumPy array or a torch tensor (any device)."""
    if hasattr(features, "detach"):  # torch.Tensor, without importing torch here
        features = features.detach().cpu().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or infinity")
    return array


class FeatureStats:
    """Streaming per-class mean and covariance of feature vectors.

    >>> stats = FeatureStats()
    >>> stats.update(features, labels)          # (N, d) array or tensor, N class names
    >>> total = stats_a + stats_b               # exact merge, order does not matter
    >>> mu, sigma = total.mean_cov("Effusion")  # float64 (d,), (d, d), ddof=1
    >>> total.save("real.npz", classifier_sha256=sha, preprocessing=prep.to_dict())
    """

    def __init__(self, dim: int | None = None, meta: Mapping[str, Any] | None = None) -> None:
        if dim is not None and dim <= 0:
            raise ValueError(f"feature dimension must be positive, got {dim}")
        self._dim = dim
        self._classes: dict[str, _ClassSums] = {}
        #: What produced the features (classifier sha256, preprocessing, ...); saved with them.
        self.meta: dict[str, Any] = dict(meta or {})

    # -- inspection ------------------------------------------------------------------------

    @property
    def dim(self) -> int | None:
        """Feature dimension, None until the first non-empty update."""
        return self._dim

    @property
    def labels(self) -> tuple[str, ...]:
        """Classes seen so far, in order of first appearance."""
        return tuple(self._classes)

    def count(self, label: str) -> int:
        """Number of feature vectors of ``label`` (0 when never seen)."""
        sums = self._classes.get(label)
        return sums.n if sums is not None else 0

    def __repr__(self) -> str:
        counts = ", ".join(f"{label}={s.n}" for label, s in self._classes.items())
        return f"FeatureStats(dim={self._dim}, {counts or 'empty'})"

    def _check_dim(self, dim: int, what: str) -> None:
        if self._dim is None:
            self._dim = dim
        elif dim != self._dim:
            raise ValueError(
                f"{what} has feature dimension {dim}, these statistics have {self._dim}"
            )

    # -- accumulation ----------------------------------------------------------------------

    def update(self, features: Any, labels: Sequence[str] | np.ndarray) -> None:
        """Add ``features`` (N, d), row i belonging to class ``labels[i]``."""
        x = _as_features(features)
        names = np.asarray(labels, dtype=str).reshape(-1)
        if names.size != x.shape[0]:
            raise ValueError(f"{x.shape[0]} feature rows but {names.size} labels")
        if x.shape[0] == 0:
            return
        self._check_dim(x.shape[1], "update")
        unique, first, inverse = np.unique(names, return_index=True, return_inverse=True)
        for position in np.argsort(first):  # classes in order of first appearance
            label, rows = str(unique[position]), x[inverse.reshape(-1) == position]
            sums = self._classes.get(label)
            if sums is None:
                sums = self._classes[label] = _ClassSums(
                    0, rows.mean(axis=0), np.zeros(x.shape[1]), np.zeros((x.shape[1],) * 2)
                )
            centred = rows - sums.shift  # (m, d)
            sums.n += rows.shape[0]
            sums.sum += centred.sum(axis=0)
            sums.outer += centred.T @ centred

    def merge(self, other: FeatureStats) -> FeatureStats:
        """A new accumulator holding both; neither input changes.

        Metadata is merged too; a key both carry with different values (two classifiers, two
        preprocessings) is an error, since such features do not belong to one distribution.
        """
        if not isinstance(other, FeatureStats):
            raise TypeError(f"cannot merge FeatureStats with {type(other).__name__}")
        if self._dim is not None and other._dim is not None and self._dim != other._dim:
            raise ValueError(
                f"cannot merge statistics of feature dimension {self._dim} and {other._dim}"
            )
        shared = self.meta.keys() & other.meta.keys()
        conflicts = [k for k in shared if self.meta[k] != other.meta[k]]
        if conflicts:
            key = sorted(conflicts)[0]
            raise ValueError(
                f"cannot merge statistics with different {key!r}: "
                f"{self.meta[key]!r} vs {other.meta[key]!r}"
            )
        merged = FeatureStats(self._dim if self._dim is not None else other._dim,
                              {**self.meta, **other.meta})
        merged._classes = {label: sums.copy() for label, sums in self._classes.items()}
        for label, sums in other._classes.items():
            merged._absorb(label, sums)
        return merged

    def _absorb(self, label: str, sums: _ClassSums) -> None:
        """Merge one class's sums into this accumulator in place (``sums`` is not kept)."""
        mine = self._classes.get(label)
        self._classes[label] = sums.copy() if mine is None else mine.merged(sums)

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return self.merge(other)

    def __radd__(self, other: Any) -> FeatureStats:
        # sum(list_of_stats) starts from 0.
        if isinstance(other, int) and other == 0:
            return self.merge(FeatureStats())
        return NotImplemented

    # -- results ---------------------------------------------------------------------------

    def mean_cov(self, label: str) -> tuple[np.ndarray, np.ndarray]:
        """Mean (d,) and unbiased covariance (d, d) of class ``label`` (ddof=1, as np.cov)."""
        sums = self._classes.get(label)
        if sums is None:
            raise ValueError(
                f"no features for class {label!r}; have: {', '.join(self._classes) or 'none'}"
            )
        if sums.n < 2:
            raise ValueError(f"class {label!r} has {sums.n} feature vector; a covariance needs 2")
        offset = sums.sum / sums.n  # mean - shift, small by construction
        cov = (sums.outer - sums.n * np.outer(offset, offset)) / (sums.n - 1)
        return sums.shift + offset, (cov + cov.T) * 0.5

    # -- Ray Data batches ------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """One row per class: ``label`` (C,), ``n`` (C,), ``shift`` (C, d), ``sum`` (C, d) and
        ``outer`` (C, d, d), the sums taken around ``shift``.

        A Ray Data ``map_batches`` stage can return this dict as its batch; concatenated
        batches (any number of rows per class) go back through :meth:`from_arrays`.
        """
        d = self._dim or 0
        rows = list(self._classes.items())
        return {
            "label": np.array([label for label, _ in rows], dtype=str),
            "n": np.array([s.n for _, s in rows], dtype=np.int64),
            "shift": np.stack([s.shift for _, s in rows]) if rows else np.zeros((0, d)),
            "sum": np.stack([s.sum for _, s in rows]) if rows else np.zeros((0, d)),
            "outer": np.stack([s.outer for _, s in rows]) if rows else np.zeros((0, d, d)),
        }

    @classmethod
    def from_arrays(cls, batch: Mapping[str, Any]) -> FeatureStats:
        """Rebuild (and merge rows of the same class) from :meth:`to_arrays`-style columns."""
        missing = [k for k in ("label", "n", "shift", "sum", "outer") if k not in batch]
        if missing:
            raise ValueError(f"statistics batch lacks column(s) {', '.join(missing)}")
        labels = [str(v) for v in np.asarray(batch["label"]).reshape(-1)]
        counts = np.asarray(batch["n"], dtype=np.int64).reshape(-1)
        # Ray may hand tensor columns back as object arrays of per-row arrays.
        columns = {k: _stack_rows(batch[k]) for k in ("shift", "sum", "outer")}
        if not all(len(col) == len(labels) for col in (counts, *columns.values())):
            raise ValueError("statistics batch columns have different numbers of rows")
        total = cls()
        for i, label in enumerate(labels):
            shift = np.asarray(columns["shift"][i], dtype=np.float64)
            d = shift.shape[0] if shift.ndim == 1 else -1
            if shift.ndim != 1 or np.shape(columns["sum"][i]) != (d,) or np.shape(
                columns["outer"][i]
            ) != (d, d):
                raise ValueError(f"statistics row {i} ({label!r}) has inconsistent shapes")
            total._check_dim(d, f"statistics row {i} ({label!r})")
            if counts[i] < 0:
                raise ValueError(f"statistics row {i} ({label!r}) has a negative count")
            if counts[i] > 0:
                total._absorb(label, _ClassSums(
                    int(counts[i]), shift,
                    np.asarray(columns["sum"][i], dtype=np.float64),
                    np.asarray(columns["outer"][i], dtype=np.float64),
                ))
        return total

    # -- persistence -----------------------------------------------------------------------

    def to_bytes(self, **meta: Any) -> bytes:
        """The ``.npz`` file's bytes (for an object store: one upload, whole or nothing)."""
        merged_meta = {**self.meta, **meta}
        try:
            meta_json = json.dumps(merged_meta, sort_keys=True)
        except TypeError as error:
            raise ValueError(f"statistics metadata must be JSON-serialisable: {error}") from None
        arrays = self.to_arrays()
        buffer = io.BytesIO()
        np.savez(
            buffer,
            format=np.array(NPZ_FORMAT),
            dim=np.array(-1 if self._dim is None else self._dim),
            meta=np.array(meta_json),
            **arrays,
        )
        return buffer.getvalue()

    def save(self, path: str | os.PathLike[str], **meta: Any) -> None:
        """Write an ``.npz`` atomically; ``meta`` (JSON-serialisable) joins :attr:`meta`.

        Pass what produced the features, e.g. ``classifier_sha256=...`` and
        ``preprocessing=...``, so a cached statistic is reused only when it matches.
        """
        resolve(path).write_bytes(self.to_bytes(**meta))

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "statistics") -> FeatureStats:
        """Inverse of :meth:`to_bytes`; ``source`` names the file in error messages."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except Exception as error:  # zipfile/ValueError/OSError: all mean "not our file"
            raise ValueError(f"{source} is not a readable statistics .npz: {error}") from None
        if "format" not in arrays or int(arrays["format"]) != NPZ_FORMAT:
            raise ValueError(f"{source} is not a statistics file of format {NPZ_FORMAT}")
        stats = cls.from_arrays(arrays)
        dim = int(arrays["dim"])
        if dim > 0:
            stats._check_dim(dim, source)
        stats.meta = json.loads(str(arrays["meta"]))
        return stats

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
        """Read a file written by :meth:`save` (a path or an s3:// URI); metadata comes back in
        :attr:`meta`. A missing file is a :class:`~cxrfactory.storage.StorageError`."""
        loc = resolve(str(path))
        if not loc.is_file():
            raise StorageError(f"statistics file not found: {loc.uri}")
        return cls.from_bytes(loc.read_bytes(), source=loc.uri)


def _stack_rows(column: Any) -> np.ndarray:
    array = np.asarray(column)
    if array.dtype == object:
        rows = [np.asarray(row, dtype=np.float64) for row in array]
        return np.stack(rows) if rows else array
    return array

"""Exact nearest-neighbour search for the memorization audit, blocked so memory stays flat.

For every query row, :class:`NearestIndex` finds the reference row at the smallest Euclidean
distance, by brute force. At the audit's sizes (about 180,000 synthetic images against 70,000
training images, d = 1024) an exact search is a few times 10^13 multiply-adds, minutes of BLAS on
two cores; an approximate index would put a recall question in front of a privacy claim.

How: ``||q - r||² = ||q||² + ||r||² - 2 q·r``. For a block of queries against a block of the
reference, one ``addmm`` gives ``||r||² - 2 q·r`` (``||q||²`` does not change which ``r`` wins), a
row-wise min gives the block's winner and a running min over reference blocks keeps the best so
far. Memory is one ``block_rows x block_ref`` float32 buffer whatever the number of queries, and
queries may arrive as an iterable of blocks (:meth:`NearestIndex.search_blocks`) so the caller
never holds them all.

Precision: the expansion cancels in float32 (an exact duplicate scores ~1e-3 instead of 0 on
pixel-scale vectors). Two things keep the answer honest. Both sides are centred on the
reference's mean first: distances do not move, the norms shrink, and with them the cancellation.
And the winning pair's distance is recomputed directly as ``||q - r||`` in float64, so an exact
duplicate reports 0 (centring is the same float32 subtraction on both sides, so identical rows
stay identical). The float32 scores only choose the winner: two reference rows whose squared
distances to a query differ by less than float32 rounding (~1e-6 of the squared norms) may swap,
and either is then a right answer to that precision.

The products run on NumPy's BLAS (its threads: ``OPENBLAS_NUM_THREADS``; this module never sets
them); torch tensors are accepted as inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from cxrfactory.errors import UserError

__all__ = ["NearestError", "NearestIndex", "normalize_features", "thumbnail_vectors"]

#: Default reference rows per product: with 4096 query rows a 128 MiB float32 score buffer, big
#: enough for BLAS to run at full speed (benchmarks/bench_audit.py), small next to the reference.
BLOCK_REF = 8192


class NearestError(UserError, ValueError):
    """Vectors the search cannot take (wrong shape, dimension or non-finite values)."""


def _matrix(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, d) array, checked finite."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 2:
        raise NearestError(f"{what} must be a 2-D (rows, dim) array, got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise NearestError(f"{what} must hold numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise NearestError(f"{what} holds NaN or infinite values: check the feature bank")
    return x


def normalize_features(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32 (n, d).

    The audit compares features as directions (cosine geometry: ``||a - b||² = 2 - 2 cos``), so a
    change of the features' overall scale, or of one image's, does not move the rule. A zero row
    has no direction and is refused rather than silently put at distance 1 from everything.
    """
    x = _matrix(x, "features")
    norms = np.sqrt(np.square(x, dtype=np.float64).sum(axis=1))  # float64: d terms summed
    if (norms == 0).any():
        raise NearestError(f"{int((norms == 0).sum())} feature rows are all zero: they have no "
                           "direction to compare; check the classifier's feature extraction")
    return (x / norms[:, None]).astype(np.float32)


def thumbnail_vectors(thumbs: np.ndarray) -> np.ndarray:
    """uint8 thumbnails (n, h, w) or (n, h*w) as float32 rows (n, h*w) in [0, 1].

    uint8 only: the 1/255 scale is right for 8-bit pixels alone, and a float input could already
    be scaled (a second division would shrink every pixel distance 255 times, silently).
    """
    thumbs = np.asarray(thumbs)
    if thumbs.dtype != np.uint8 or thumbs.ndim < 2:
        raise NearestError(f"thumbnails must be a uint8 array (n, h, w) or (n, h*w), got "
                           f"{thumbs.dtype} with shape {thumbs.shape}")
    return thumbs.reshape(len(thumbs), -1).astype(np.float32) / np.float32(255)


class NearestIndex:
    """A reference matrix (n_ref, d) held once, centred, with its squared norms.

    Memory: the reference as float32 (n_ref * d * 4 bytes: 287 MB for 70,000 x 1024) plus one
    score buffer of ``block_rows * block_ref`` float32 per search.
    """

    def __init__(self, reference: np.ndarray | torch.Tensor) -> None:
        ref = _matrix(reference, "the reference")
        if len(ref) == 0:
            raise NearestError("the reference set is empty: there is nothing to search")
        # The mean in float64, then float32: both sides are centred by the same float32
        # subtraction.
        self._mean = ref.mean(axis=0, dtype=np.float64).astype(np.float32)
        self._ref = np.ascontiguousarray(ref - self._mean)  # (n_ref, d) float32
        self._ref_sq = np.square(self._ref).sum(axis=1, dtype=np.float32)  # (n_ref,) float32

    def __len__(self) -> int:
        return self._ref.shape[0]

    @property
    def dim(self) -> int:
        """The vectors' dimension d."""
        return self._ref.shape[1]

    def search(self, queries: np.ndarray, *, block_rows: int = 4096,
               block_ref: int = BLOCK_REF) -> tuple[np.ndarray, np.ndarray]:
        """For each query row its nearest reference row: (distances float64 (n_q,), indices
        int64 (n_q,)). Memory: O(block_rows * block_ref), whatever n_q."""
        return next(self.search_blocks([queries], block_rows=block_rows, block_ref=block_ref))

    def search_blocks(self, blocks: Iterable[np.ndarray], *, block_rows: int = 4096,
                      block_ref: int = BLOCK_REF) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """:meth:`search` of each block in turn, lazily: one (distances, indices) per block, so
        queries streamed from disk keep memory flat in their number."""
        if block_rows < 1 or block_ref < 1:
            raise NearestError(f"block sizes must be >= 1, got block_rows={block_rows}, "
                               f"block_ref={block_ref}")
        block_ref = min(block_ref, len(self))
        # One flat buffer, viewed as (rows, refs) for any block up to the full size: a fresh
        # 100 MB allocation per product would be page-faulted in again every time.
        buffer = np.empty(0, dtype=np.float32)
        for block in blocks:
            queries = _matrix(block, "the queries")
            if queries.shape[1] != self.dim:
                raise NearestError(f"the queries have dimension {queries.shape[1]}, the reference "
                                   f"{self.dim}: were both made by the same classifier or "
                                   "thumbnail size?")
            rows = min(block_rows, len(queries))
            if buffer.size < rows * block_ref:
                buffer = np.empty(rows * block_ref, dtype=np.float32)
            parts = [self._search_rows(queries[start:start + block_rows], block_ref, buffer)
                     for start in range(0, len(queries), block_rows)]
            if not parts:
                yield np.zeros(0, np.float64), np.zeros(0, np.int64)
                continue
            yield (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def _search_rows(self, queries: np.ndarray, block_ref: int,
                     buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One query block (B, d) against the whole reference, block_ref rows at a time."""
        q = queries - self._mean  # (B, d), centred like the reference
        q_scaled = np.float32(-2) * q
        n = q.shape[0]
        ref_all, ref_sq, flat = self._ref, self._ref_sq, buffer
        best = np.full(n, np.inf, dtype=np.float32)
        best_index = np.zeros(n, dtype=np.int64)
        rows = np.arange(n)
        for start in range(0, len(self), block_ref):
            ref = ref_all[start:start + block_ref]  # (R, d)
            scores = flat[: n * ref.shape[0]].reshape(n, ref.shape[0])
            # ||r||² - 2 q·r: ||q||² is the same for every r of a row, so it cannot change the
            # argmin and is left out of the (B, R) matrix. NumPy's BLAS, not torch's: on the
            # development CPU it ran this product 1.38x faster (BENCHMARKS.md, the audit).
            np.matmul(q_scaled, ref.T, out=scores)
            scores += ref_sq[start:start + ref.shape[0]]
            index = scores.argmin(axis=1)
            value = scores[rows, index]
            better = value < best  # strict: a tie keeps the earlier reference row
            best = np.where(better, value, best)
            best_index = np.where(better, index + start, best_index)
        # The winner's distance exactly, in float64: an exact copy gives 0, not the
        # expansion's float32 residue.
        diff = q.astype(np.float64) - ref_all[best_index].astype(np.float64)
        distance = np.sqrt(np.square(diff).sum(axis=1))
        return distance, best_index

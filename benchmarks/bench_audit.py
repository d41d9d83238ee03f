"""Exact nearest-neighbour search for the memorization audit: throughput and memory.

The audit's goal: about 180,000 synthetic images against 70,000 training images at d = 1024, in
both spaces (unit-length features, 32x32 thumbnails), on a 2-core CPU in at most 10 minutes, with
memory flat in the number of synthetic images. A smaller case is measured and extrapolated:

1. ``NearestIndex.search_blocks``: ``--real`` random reference rows against each of ``--queries``
   query counts, both spaces (random unit features; random uint8 thumbnails), queries streamed in
   blocks of ``--stream`` rows (one pre-drawn block per space, yielded again and again: drawing
   them would be timed too, and the search's cost does not depend on the values). Peak RSS per
   query count (Linux: VmHWM, reset before each case), so equal peaks mean flat memory.
2. Baselines in the same run: raw BLAS throughput of one product of the search's block shape,
   NumPy (its OpenBLAS, the search's own BLAS since the search moved off torch's) and torch, as
   GFLOP/s; and a naive unblocked
   ``torch.cdist(q, ref).min(1)`` over ``--cdist-queries`` queries (memory O(n_q x n_ref)).

Rates count 2 n_q n_ref d flops per space (the product; the rest is a small share).

    python benchmarks/bench_audit.py [--real 70000] [--queries 2000 4000 8000] [--dim 1024]
                                     [--threads N]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from cxrfactory.metrics.nearest import BLOCK_REF, NearestIndex, normalize_features, thumbnail_vectors

GOAL_QUERIES, GOAL_SPACES, GOAL_SECONDS = 180_000, 2, 600


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not
    possible (not Linux), and peaks are then the process's lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stream(block: np.ndarray, total: int) -> Iterator[np.ndarray]:
    """``total`` query rows as repeats of one block (the last one cut short)."""
    for start in range(0, total, len(block)):
        yield block[: min(len(block), total - start)]


def _median_seconds(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Median (wall-clock, CPU) seconds of ``fn`` over ``rounds`` runs after a warm-up."""
    fn()  # warm-up: thread pool, allocator
    wall, cpu = [], []
    for _ in range(rounds):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", type=int, default=70_000, help="reference (training) rows")
    parser.add_argument("--queries", type=int, nargs="+", default=[2000, 4000, 8000],
                        help="query (synthetic) counts, each searched in both spaces")
    parser.add_argument("--dim", type=int, default=1024,
                        help="vector dimension (features; thumbnails are 32x32 = 1024)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for the torch baselines (default: torch's "
                             "choice); the search's NumPy threads: OPENBLAS_NUM_THREADS")
    parser.add_argument("--stream", type=int, default=2000,
                        help="rows per streamed query block (with --block-rows, the smaller "
                        "sets the score buffer: memory)")
    parser.add_argument("--block-rows", type=int, default=4096, help="search query block")
    parser.add_argument("--block-ref", type=int, default=BLOCK_REF, help="search reference block")
    parser.add_argument("--cdist-queries", type=int, default=1000,
                        help="queries for the naive torch.cdist baseline (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.real, args.dim, args.stream, args.block_rows, args.block_ref, *args.queries) < 1:
        parser.error("--real, --queries, --dim, --stream and the block sizes must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"# Memorization audit: exact nearest-neighbour search, d = {args.dim}\n")
    print("command: python benchmarks/bench_audit.py " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv))
    env = ", ".join(f"{k}={os.environ.get(k, 'unset')}"
                    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"))
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, {env}; "
          f"load average before: {os.getloadavg()[0]:.1f}\n")

    # Reference sets, as the audit builds them: unit features; thumbnails scaled to [0, 1].
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    feature_ref = normalize_features(rng.standard_normal((args.real, args.dim), dtype=np.float32))
    pixel_ref = thumbnail_vectors(rng.integers(0, 256, (args.real, args.dim), dtype=np.uint8))
    indexes = {"feature": NearestIndex(feature_ref), "pixel": NearestIndex(pixel_ref)}
    blocks = {"feature": normalize_features(rng.standard_normal((args.stream, args.dim),
                                                                dtype=np.float32)),
              "pixel": thumbnail_vectors(rng.integers(0, 256, (args.stream, args.dim),
                                                      dtype=np.uint8))}
    base_rss = _rss_mib()
    print(f"two indexes of {args.real} x {args.dim} built in {time.perf_counter() - start:.1f} s; "
          f"RSS {base_rss:.0f} MiB (the two references and their inputs)\n")

    # Baselines: one product of the search's block shape.
    # The search multiplies blocks of min(stream, block_rows) queries by block_ref references.
    rows, refs = min(args.block_rows, args.stream), min(args.block_ref, args.real)
    a = torch.from_numpy(blocks["feature"][:rows].copy())
    b = torch.from_numpy(feature_ref[:refs].copy())
    flops = 2 * rows * refs * args.dim
    gemm = {name: tuple(flops / t / 1e9 for t in _median_seconds(fn, 3))  # (wall, per CPU s)
            for name, fn in (("torch", lambda: torch.mm(a, b.T)),
                             ("numpy", lambda: a.numpy() @ b.numpy().T))}

    # The search, every query count, both spaces.
    print(f"## Search: {args.real} reference rows, both spaces, blocks {args.block_rows} x "
          f"{args.block_ref}, queries streamed {args.stream} at a time\n")
    print("| queries | seconds (2 spaces) | CPU seconds | searches/s (query x space) | GFLOP/s "
          "| GFLOP per CPU second | peak RSS (MiB) | peak above the indexes (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rate = gflops = per_cpu = 0.0
    for n in args.queries:
        exact_peak = _reset_peak()
        start, cpu_start = time.perf_counter(), time.process_time()
        for space, index in indexes.items():
            for dist, _ in index.search_blocks(_stream(blocks[space], n),
                                               block_rows=args.block_rows,
                                               block_ref=args.block_ref):
                assert np.isfinite(dist).all()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        rate = 2 * n / seconds
        gflops = 2 * n * 2 * args.real * args.dim / seconds / 1e9
        per_cpu = gflops * seconds / cpu
        peak = _peak_mib()
        print(f"| {n} | {seconds:.1f} | {cpu:.1f} | {rate:.0f} | {gflops:.1f} | {per_cpu:.1f} | "
              f"{peak:.0f}{'' if exact_peak else ' (lifetime)'} | {peak - base_rss:.0f} |")

    # Naive baseline: the whole distance matrix at once.
    cdist = None
    if args.cdist_queries:
        q = torch.from_numpy(np.resize(blocks["feature"], (args.cdist_queries, args.dim)))
        r = torch.from_numpy(feature_ref)
        cdist_flops = 2 * args.cdist_queries * args.real * args.dim
        cdist = tuple(cdist_flops / t / 1e9
                      for t in _median_seconds(lambda: torch.cdist(q, r).min(dim=1), 1))

    # Two extrapolations: the wall-clock rate as measured (this machine as shared right now),
    # and the CPU time spread over the threads (the machine to itself; spin-waiting under
    # contention inflates CPU time, so this one errs slow).
    goal_flops = GOAL_QUERIES * GOAL_SPACES * 2 * args.real * args.dim
    threads = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.cpu_count() or 1)  # the search's BLAS threads
    print(f"\nextrapolated, {GOAL_QUERIES} queries x {GOAL_SPACES} spaces against {args.real} "
          f"rows at the last row's rates: {goal_flops / gflops / 1e9 / 60:.1f} min wall-clock as "
          f"measured; {goal_flops / (per_cpu * threads) / 1e9 / 60:.1f} min on {threads} "
          f"dedicated cores" + (f" (goal: {GOAL_SECONDS / 60:.0f} min)"
                                if (args.real, args.dim) == (70_000, 1024) else "") + "\n")
    print("## Baselines, same run\n")
    print("| measure | GFLOP/s | GFLOP per CPU second | search's ratio to it (wall, per CPU s) |")
    print("|---|---:|---:|---:|")
    rows_out = [(f"torch.mm {rows} x {args.dim} x {refs} (torch's BLAS)", gemm["torch"]),
                ("numpy matmul, same shape (NumPy's OpenBLAS, the search's)", gemm["numpy"])]
    if cdist is not None:
        rows_out.append((f"torch.cdist + min, {args.cdist_queries} x {args.real} unblocked "
                         f"({args.cdist_queries * args.real * 4 / 2**20:.0f} MiB matrix), "
                         "same flop count", cdist))
    for label, (wall, cpu) in rows_out:
        print(f"| {label} | {wall:.1f} | {cpu:.1f} | {gflops / wall:.2f}, {per_cpu / cpu:.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

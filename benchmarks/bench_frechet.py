"""Fréchet distance at d = 1024: cxrfactory's symmetric-eigh form vs pytorch-fid's sqrtm.

Two measurements, both against pytorch-fid's ``calculate_frechet_distance`` in the same run:

1. one comparison (one pair of Gaussians);
2. an FDD table: ``--classes`` real-image statistics, each compared with ``--candidates``
   synthetic sets (e.g. several generator checkpoints), with the real side's factorisation
   prepared once per class (``prepare_reference``) and reused.

Both implementations run on NumPy/SciPy's OpenBLAS with the same threads; set
``OPENBLAS_NUM_THREADS`` to choose (on a machine shared with other jobs, 1 thread avoids
OpenBLAS's spin-waiting when the cores are taken, which distorts both sides).

Covariances are synthetic SPD matrices with a DenseNet-like decaying spectrum (eigenvalues
log-uniform over four decades) in random orientations. Prints a Markdown report.

    python benchmarks/bench_frechet.py [--dim 1024] [--classes 9] [--candidates 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from pytorch_fid.fid_score import calculate_frechet_distance

from cxrfactory.metrics.frechet import frechet_distance, prepare_reference


def _random_gaussian(rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eigenvalues = 10.0 ** rng.uniform(-4.0, 0.0, size=d)
    return rng.standard_normal(d) * 0.1, (q * eigenvalues) @ q.T


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, float(result)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension")
    parser.add_argument("--classes", type=int, default=9, help="real-side statistics")
    parser.add_argument("--candidates", type=int, default=2,
                        help="synthetic sets compared with every class")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the single comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dim < 2 or args.classes < 1 or args.candidates < 1 or args.repeats < 1:
        parser.error("--dim must be >= 2 and --classes, --candidates, --repeats >= 1")

    rng = np.random.default_rng(args.seed)
    d = args.dim
    print(f"# Fréchet distance, d = {d}\n")
    threads = {k: os.environ.get(k, "unset") for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs, "
          + ", ".join(f"{k}={v}" for k, v in threads.items()) + "\n")

    # Other processes share the CPUs: every measurement alternates the implementations, so
    # a burst of contention slows both rather than one.

    # 1. One comparison.
    mu1, sigma1 = _random_gaussian(rng, d)
    mu2, sigma2 = _random_gaussian(rng, d)
    single: dict[str, list[float]] = {"fid": [], "ours": []}
    for _ in range(args.repeats):
        t_fid, expected = _timed(lambda: calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
        t_ours, got = _timed(lambda: frechet_distance(mu1, sigma1, mu2, sigma2))
        single["fid"].append(t_fid)
        single["ours"].append(t_ours)
    t_fid, t_ours = statistics.median(single["fid"]), statistics.median(single["ours"])
    print(f"## One comparison (median of {args.repeats})\n")
    print("| implementation | seconds | speed-up |")
    print("|---|---|---|")
    print(f"| pytorch-fid `calculate_frechet_distance` (baseline) | {t_fid:.3f} | 1.00x |")
    print(f"| cxrfactory `frechet_distance` | {t_ours:.3f} | {t_fid / t_ours:.2f}x |")
    print(f"\nvalues: pytorch-fid {expected:.10g}, cxrfactory {got:.10g}, "
          f"relative difference {abs(got - expected) / abs(expected):.2e}\n")

    # 2. A table: every class's real statistic against every candidate set.
    totals = {"fid": 0.0, "plain": 0.0, "reuse": 0.0}
    worst = {"plain": 0.0, "reuse": 0.0}
    for _ in range(args.classes):
        mu_r, sigma_r = _random_gaussian(rng, d)
        start = time.perf_counter()
        reference = prepare_reference(mu_r, sigma_r)
        totals["reuse"] += time.perf_counter() - start
        for _ in range(args.candidates):
            mu_s, sigma_s = _random_gaussian(rng, d)
            t, baseline = _timed(lambda: calculate_frechet_distance(mu_r, sigma_r, mu_s, sigma_s))
            totals["fid"] += t
            for name, fn in (("plain", lambda: frechet_distance(mu_r, sigma_r, mu_s, sigma_s)),
                             ("reuse", lambda: reference.distance(mu_s, sigma_s))):
                t, value = _timed(fn)
                totals[name] += t
                worst[name] = max(worst[name], abs(value - baseline) / abs(baseline))
    count = args.classes * args.candidates
    print(f"## Table: {args.classes} classes x {args.candidates} candidate sets "
          f"= {count} distances (total seconds)\n")
    print("| implementation | seconds | speed-up |")
    print("|---|---|---|")
    print(f"| pytorch-fid, one call per distance (baseline) | {totals['fid']:.2f} | 1.00x |")
    print(f"| `frechet_distance`, one call per distance | {totals['plain']:.2f} | "
          f"{totals['fid'] / totals['plain']:.2f}x |")
    print(f"| `prepare_reference` once per class + `distance` | {totals['reuse']:.2f} | "
          f"{totals['fid'] / totals['reuse']:.2f}x |")
    print(f"\nlargest relative difference from pytorch-fid: {worst['reuse']:.2e} (reused), "
          f"{worst['plain']:.2e} (one call per distance)")

if __name__ == "__main__":
    main()

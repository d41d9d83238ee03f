"""Phantom throughput: images per second rendered, PNG-encoded and written.

    python benchmarks/bench_phantoms.py [--num-images 2000] [--resolution 256] [--workers 1 2]

Rows (all in this one run, on the same specs):
- render only: ``render`` in a plain loop, no encoding or files (where the time goes);
- single-process baseline: a plain loop that renders, encodes and writes each PNG;
- write_phantom_folder with W workers: the product path (temporary names and renames, the
  marker and the CSV; W > 1 runs a spawn process pool, its start-up included).
The target is 200 images/s at 256 px with 2 workers on a 2-core machine. Each row also gives
the CPU time per image (this process plus its workers): on a shared, busy machine wall-clock
rates fall with the load, CPU time much less, and 1000 / (CPU ms per image) x cores is the rate
an idle machine reaches.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.data import phantom as P  # noqa: E402
from cxrfactory.images import encode_png  # noqa: E402


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class _Timer:
    """Wall-clock and CPU time of a block."""

    def __enter__(self) -> _Timer:
        self.wall, self.cpu = time.perf_counter(), _cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu_seconds() - self.cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    if args.num_images <= 0 or args.resolution < P.MIN_RESOLUTION or min(args.workers) < 1:
        p.error("--num-images and --workers must be positive, --resolution at least 32")

    specs = P.sample_specs(args.num_images, seed=0)
    n = len(specs)
    rows: list[tuple[str, _Timer]] = []
    load_before = os.getloadavg()[0]

    with _Timer() as timer:
        for spec in specs:
            P.render(spec, args.resolution)
    rows.append(("render only (1 process)", timer))

    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / "baseline"
        baseline.mkdir()
        with _Timer() as timer:
            for spec in specs:
                image = encode_png(P.render(spec, args.resolution))
                (baseline / spec.image_id).write_bytes(image)
        rows.append(("single-process baseline: render + PNG + write", timer))
        for workers in args.workers:
            out = Path(scratch) / f"workers{workers}"
            with _Timer() as timer:
                P.write_phantom_folder(out, specs, args.resolution, workers=workers)
            rows.append((f"write_phantom_folder, workers={workers}", timer))
            shutil.rmtree(out)

    base = n / rows[1][1].wall
    print(f"{n} phantoms at {args.resolution} px, {os.cpu_count()} CPUs, load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("| path | images/s | vs baseline | CPU ms / image |")
    print("|---|---:|---:|---:|")
    for name, timer in rows:
        rate = n / timer.wall
        print(f"| {name} | {rate:.0f} | {rate / base:.2f}x | {1000 * timer.cpu / n:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

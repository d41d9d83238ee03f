"""Feature extraction throughput and feature-statistics memory.

1. ``XrayDenseNet.features`` (DenseNet-121, one channel) images/s against a bare torchvision
   ``densenet121`` with a one-channel conv0 calling its own ``forward`` on the same inputs,
   same threads, same batch, alternating round by round (the CPUs are shared with other jobs).
2. ``preprocess`` images/s: uint8 NIH-size images (1024 px) to normalised 224-px input.
3. ``FeatureStats`` memory: tracemalloc peak while accumulating 1k and 10k images of
   d = 1024 over 9 classes; constant in the number of images means O(d²) per class.

    python benchmarks/bench_features.py [--batch 16] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc

import numpy as np
import torch
import torchvision
from torch import nn

from cxrfactory.labels import DEFAULT_CLASSES
from cxrfactory.metrics.stats import FeatureStats
from cxrfactory.models.densenet import Preprocessing, densenet121_xray, preprocess


def _bare_torchvision_densenet() -> nn.Module:
    net = torchvision.models.densenet121(weights=None)
    net.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return net.eval()


def bench_throughput(batch: int, resolution: int, rounds: int) -> None:
    torch.manual_seed(0)
    ours = densenet121_xray(num_classes=len(DEFAULT_CLASSES)).eval()
    bare = _bare_torchvision_densenet()
    x = torch.randn(batch, 1, resolution, resolution)
    runs = {"bare": lambda: bare(x), "ours": lambda: ours.features(x)}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up: allocator, oneDNN primitive caches
            fn()
        for _ in range(rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                seconds[name].append(time.perf_counter() - start)
    rate = {name: batch / statistics.median(times) for name, times in seconds.items()}
    print(f"## DenseNet-121 forward, batch {batch}, {resolution} px, "
          f"median of {rounds} rounds\n")
    print("| network | images/s | ratio |")
    print("|---|---|---|")
    print(f"| torchvision densenet121 (1-channel conv0), `forward` (baseline) | "
          f"{rate['bare']:.2f} | 1.00 |")
    print(f"| `XrayDenseNet.features` | {rate['ours']:.2f} | {rate['ours'] / rate['bare']:.2f} |")
    print()


def bench_preprocess(batch: int, source: int, resolution: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(batch, source, source), dtype=np.uint8)
    prep = Preprocessing(resolution=resolution)
    preprocess(images, prep)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        preprocess(images, prep)
        times.append(time.perf_counter() - start)
    print(f"## Preprocessing, uint8 {source} px -> {resolution} px (antialiased bilinear)\n")
    print(f"{batch / statistics.median(times):.1f} images/s (batch {batch}, median of {rounds})\n")


def _stats_peak(n_images: int, dim: int, chunk: int) -> tuple[float, float]:
    """(tracemalloc peak in MiB, seconds) for accumulating ``n_images`` random features."""
    rng = np.random.default_rng(1)
    classes = np.array(DEFAULT_CLASSES)
    tracemalloc.start()
    start = time.perf_counter()
    stats = FeatureStats()
    for first in range(0, n_images, chunk):
        rows = min(chunk, n_images - first)
        # float32 like the network's output; the batch itself is counted in the peak.
        features = rng.standard_normal((rows, dim), dtype=np.float32)
        stats.update(features, classes[rng.integers(0, len(classes), size=rows)])
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sum(stats.count(c) for c in classes) == n_images
    return peak / 2**20, elapsed


def bench_stats_memory(dim: int, chunk: int, sizes: list[int]) -> None:
    held = len(DEFAULT_CLASSES) * (dim * dim + 2 * dim) * 8 / 2**20
    print(f"## FeatureStats memory, d = {dim}, {len(DEFAULT_CLASSES)} classes, "
          f"batches of {chunk}\n")
    print(f"the sums themselves: {held:.1f} MiB ({len(DEFAULT_CLASSES)} x (d² + 2d) float64)\n")
    print("| images | tracemalloc peak (MiB) | peak / first row's peak | seconds |")
    print("|---|---|---|---|")
    first_peak = None
    for n in sizes:
        peak, seconds = _stats_peak(n, dim, chunk)
        first_peak = first_peak or peak
        print(f"| {n} | {peak:.1f} | {peak / first_peak:.3f} | {seconds:.2f} |")
    print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="images per forward")
    parser.add_argument("--resolution", type=int, default=224, help="network input size")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per network")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension for statistics")
    parser.add_argument("--stats-sizes", type=int, nargs="+", default=[1000, 10000],
                        help="image counts for the statistics memory measurement")
    args = parser.parse_args(argv)
    if min(args.batch, args.resolution, args.rounds, args.dim, *args.stats_sizes) < 1:
        parser.error("all sizes and counts must be positive")
    if args.resolution < 32:
        parser.error("--resolution must be at least 32 (DenseNet downsamples 32x)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    print("# Feature extraction and statistics\n")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}, torch threads {torch.get_num_threads()}\n")
    bench_throughput(args.batch, args.resolution, args.rounds)
    bench_preprocess(args.batch, 1024, args.resolution, args.rounds)
    bench_stats_memory(args.dim, 250, args.stats_sizes)


if __name__ == "__main__":
    main()

"""Reading a whole shard folder with ``pandas.read_parquet(root)`` vs the same files one by one.

The folder is what ``jobs/synthesize.py`` writes (``train/<Class>/part-NNNNN.parquet``, the
sidecars beside them): ``--rows`` rows over 9 classes, ``--rows-per-file`` a file, each row a
``--side`` px grayscale PNG of smoothed noise (about the size of a generated image). The
baseline is what a user would otherwise write: ``pd.concat`` of ``pd.read_parquet(file)`` over
the files the manifest lists. Rounds alternate between the two; the medians and their ratio
are printed as a Markdown row.

    python benchmarks/bench_readers.py [--rows 20000] [--rows-per-file 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory import shards  # noqa: E402
from cxrfactory.images import encode_png  # noqa: E402
from cxrfactory.labels import DEFAULT_CLASSES  # noqa: E402
from cxrfactory.storage import resolve  # noqa: E402


def write_set(root: Path, rows: int, rows_per_file: int, side: int) -> shards.Manifest:
    rng = np.random.default_rng(0)
    loc, files, counts = resolve(root), [], {}
    per_class = np.array_split(np.arange(rows), len(DEFAULT_CLASSES))
    for label, numbers in zip(DEFAULT_CLASSES, per_class):
        counts[label] = len(numbers)
        for k, start in enumerate(range(0, len(numbers), rows_per_file)):
            part = []
            for n in numbers[start:start + rows_per_file]:
                noise = rng.normal(128, 40, (side // 4, side // 4)).clip(0, 255).astype(np.uint8)
                pixels = np.kron(noise, np.ones((4, 4), np.uint8))  # blocky, compresses like an X-ray
                part.append({"image_id": f"syn-{label}-{n}", "label": label, "findings": [label],
                             "image": {"bytes": encode_png(pixels), "path": None},
                             "split": shards.SYNTHETIC_SPLIT, "patient_id": None,
                             "source": "synthetic", "seed": int(n), "generator": "0" * 64,
                             "height": side, "width": side})
            files.append(shards.shard_path(shards.SYNTHETIC_SPLIT, label, k))
            shards.write_shard(loc.join(files[-1]), shards.make_table(part))
    manifest = shards.Manifest(source="synthetic", classes=list(DEFAULT_CLASSES),
                               counts={shards.SYNTHETIC_SPLIT: counts}, files=files)
    shards.write_manifest(loc, manifest)
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--rows-per-file", type=int, default=1000)
    p.add_argument("--side", type=int, default=64, help="image side in px (default 64)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "set"
        manifest = write_set(root, args.rows, args.rows_per_file, args.side)
        paths = [str(root / f) for f in manifest.files]
        size = sum((root / f).stat().st_size for f in manifest.files) / 2**20
        timings: dict[str, list[float]] = {"folder": [], "files": []}
        for _ in range(args.rounds):
            for name in timings:
                started = time.perf_counter()
                frame = (pd.read_parquet(root) if name == "folder"
                         else pd.concat([pd.read_parquet(f) for f in paths], ignore_index=True))
                timings[name].append(time.perf_counter() - started)
                assert len(frame) == args.rows
        folder, files = statistics.median(timings["folder"]), statistics.median(timings["files"])
    print(f"| `pd.read_parquet(root)`, {args.rows:,} rows, {len(paths)} files, {size:.0f} MiB | "
          f"{folder:.3f} s | {files:.3f} s (files one by one) | {folder / files:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

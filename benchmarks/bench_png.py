"""The project's PNG encoder (``images.encode_png``, PNG's "Up" filter on every row) vs
Pillow's (all five filters tried per row) at the same zlib level, on phantoms and on noise.

Every image the project writes goes through the encoder (phantoms, real shards, synthetic
shards), so its speed is the PNG part of ingest and synthesis. Both encoders are timed in the
same run, alternating, on the same images; the decoded pixels must be identical. Prints one
Markdown row per image kind: median ms per image for each and the ratio.

    python benchmarks/bench_png.py [--sides 64 256] [--images 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.data.phantom import sample_specs  # noqa: E402
from cxrfactory.data.phantom_render import render  # noqa: E402
from cxrfactory.images import PNG_COMPRESS_LEVEL, decode_png, encode_png  # noqa: E402


def pillow_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def median_ms(encode, images: list[np.ndarray], rounds: int) -> tuple[float, int]:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        sizes = sum(len(encode(image)) for image in images)
        times.append((time.perf_counter() - started) / len(images) * 1000)
    return statistics.median(times), sizes // len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| images | project (Up filter) ms | Pillow ms | ratio | bytes, project / Pillow |")
    print("|---|---:|---:|---:|---:|")
    for side in args.sides:
        phantoms = [render(spec, side) for spec in sample_specs(args.images, seed=1)]
        noise = [rng.integers(0, 256, (side, side), dtype=np.uint8) for _ in range(args.images)]
        for kind, images in ((f"{side} px phantoms", phantoms), (f"{side} px noise", noise)):
            for image in images[:5]:  # the same pixels come back from both
                assert np.array_equal(decode_png(encode_png(image)), decode_png(pillow_png(image)))
            ours, ours_bytes = median_ms(encode_png, images, args.rounds)
            theirs, their_bytes = median_ms(pillow_png, images, args.rounds)
            print(f"| {kind} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.2f}x faster | "
                  f"{ours_bytes:,} / {their_bytes:,} |")


if __name__ == "__main__":
    main()

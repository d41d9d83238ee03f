"""What the feature bank costs over computing features alone, and what reusing it saves.

1. Embedding: ``FeatureEmbedder`` (decode PNG, the classifier's preprocessing, features, top-1
   class, a 32x32 thumbnail, an Arrow table) against the bare path FDD took before the bank
   (decode, preprocess, ``model.features``, float64 copy), on the same batch of phantom PNGs,
   alternating round by round.
2. Storing and reading: writing the embedded rows as a Parquet part and reading them back into
   NumPy (what every later metric and run does instead of embedding again), per image, against
   the embedding's own per-image time.

    python benchmarks/bench_bank.py [--images 256] [--resolution 64] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cxrfactory.classifier.artifact import read_classifier_files, save_classifier_artifact
from cxrfactory.data.phantom import sample_specs
from cxrfactory.data.phantom_render import render
from cxrfactory.images import decode_png, encode_png
from cxrfactory.labels import DEFAULT_CLASSES
from cxrfactory.metrics.bank import FeatureEmbedder, _arrays
from cxrfactory.models.densenet import Preprocessing, densenet121_xray, preprocess


def phantom_batch(n: int, resolution: int) -> pa.Table:
    images, labels = [], []
    for i, spec in enumerate(sample_specs(n, seed=0)):
        images.append({"bytes": encode_png(render(spec, resolution)), "path": f"img{i}"})
        labels.append(spec.label)
    return pa.table({"image": images, "image_id": [f"img{i}" for i in range(n)], "label": labels,
                     "patient_id": [f"p{i}" for i in range(n)],
                     "bank": pa.array(np.zeros(n, np.int32))})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--artifact", default="/tmp/bench_bank_classifier")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = densenet121_xray(num_classes=len(DEFAULT_CLASSES)).eval()
    preprocessing = Preprocessing(resolution=args.resolution)
    save_classifier_artifact(args.artifact, model, DEFAULT_CLASSES, preprocessing)
    embedder = FeatureEmbedder(read_classifier_files(args.artifact), inference_batch=64, threads=args.threads)
    batch = phantom_batch(args.images, args.resolution)

    def bare() -> np.ndarray:  # before the bank: features only, kept as float64 statistics input
        out = []
        pngs = [item["bytes"] for item in batch.column("image").to_pylist()]
        for start in range(0, len(pngs), 64):
            x = preprocess(np.stack([decode_png(b) for b in pngs[start:start + 64]]), preprocessing)
            with torch.inference_mode():
                out.append(embedder.model.features(x).double().numpy())
        return np.concatenate(out)

    times = {"bare": [], "bank": [], "write+read": []}
    bare(), embedder(batch)  # warm-up: first calls allocate and pick kernels
    for round_ in range(args.rounds):
        for name in (("bare", "bank") if round_ % 2 == 0 else ("bank", "bare")):
            start = time.perf_counter()
            if name == "bare":
                bare()
            else:
                table = embedder(batch).drop_columns(["bank"])
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        back = pq.read_table(io.BytesIO(buffer.getvalue()))
        _arrays(back, embedder.model.feature_dim, thumbs=True)
        times["write+read"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_image = {k: 1000 * v / args.images for k, v in med.items()}
    print(f"{args.images} phantom PNGs at {args.resolution} px, DenseNet-121 (d=1024), "
          f"{args.threads} threads, median of {args.rounds} rounds")
    print("| path | ms / image | ratio to bare features |")
    print("|---|---:|---:|")
    for name, label in (("bare", "decode + preprocess + features (baseline: FDD before the bank)"),
                        ("bank", "FeatureEmbedder: + top-1 class, 32x32 thumbnail, Arrow rows"),
                        ("write+read", "Parquet part written and read back into NumPy")):
        print(f"| {label} | {per_image[name]:.2f} | {per_image[name] / per_image['bare']:.3f} |")
    print(f"bank size: {len(buffer.getvalue()) / args.images / 1024:.1f} KiB / image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

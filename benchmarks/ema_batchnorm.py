"""G_ema's BatchNorm statistics: copied from the live G, or standing statistics of its own?

    python benchmarks/ema_batchnorm.py --run demo_output/runs/proposed \
        --real demo_output/real --classifier demo_output/classifier/classifier

One training checkpoint (the run's latest), one averaged generator, two sets of BatchNorm
statistics:

- ``copy``: as saved, the live G's running statistics (``gan.ema_batchnorm=copy``);
- ``standing``: recomputed with G_ema itself over ``--standing-images`` generated images
  (``gan.ema_batchnorm=standing``, :func:`cxrfactory.models.sampling.standing_statistics`).

Each generates the same ``--samples`` images per class (same seeds) and is measured with the
classifier artifact: class-consistency (the share of images the classifier puts in the asked-for
class) and FDD against the real ``--split`` (features after the classifier's last ReLU, pooled;
equal counts on both sides). The cost is the standing pass against generating the evaluation
set, in the same run. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.gan.config import Config  # noqa: E402
from cxrfactory.metrics.frechet import frechet_distance  # noqa: E402
from cxrfactory.models import build_generator  # noqa: E402
from cxrfactory.classifier.artifact import load_classifier_artifact  # noqa: E402
from cxrfactory.models.densenet import preprocess  # noqa: E402
from cxrfactory.models.sampling import generate, standing_statistics  # noqa: E402
from cxrfactory.images import decode_png  # noqa: E402
from cxrfactory.shards import read_manifest, read_shard, select_files  # noqa: E402
from cxrfactory.storage import resolve  # noqa: E402
from cxrfactory.gan.checkpoint import find_latest, read_checkpoint  # noqa: E402


def real_images(root: str, split: str, classes: list[str]) -> dict[str, np.ndarray]:
    loc = resolve(root)
    out: dict[str, list] = {c: [] for c in classes}
    for rel in select_files(read_manifest(loc), classes, split):
        for row in read_shard(loc.join(rel), columns=["image", "label", "split"]).to_pylist():
            if row["split"] == split:
                out[row["label"]].append(decode_png(row["image"]["bytes"]))
    return {c: np.stack(v) for c, v in out.items() if v}


@torch.inference_mode()
def measure(images: np.ndarray, classifier, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W) -> (features (N, d) float64, predicted class index (N,))."""
    feats, guesses = [], []
    for start in range(0, len(images), batch):
        x = preprocess(images[start:start + batch], classifier.preprocessing)
        f = classifier.model.features(x)
        feats.append(f.double().numpy())
        guesses.append(classifier.model.classifier(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(guesses)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training run folder (jobs/train.py --storage/--run-name)")
    p.add_argument("--real", required=True, help="real shard root")
    p.add_argument("--classifier", required=True, help="classifier artifact folder")
    p.add_argument("--split", default="test")
    p.add_argument("--samples", type=int, default=200, help="generated images per class")
    p.add_argument("--standing-images", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    latest = find_latest(args.run)
    if latest is None:
        p.error(f"{args.run} holds no checkpoint-* folder with state.pt and config.json")
    state, meta = read_checkpoint(latest)
    config = Config.from_dict(meta["config"])
    classes = list(config.model.classes)
    classifier = load_classifier_artifact(args.classifier)
    position = np.array([classifier.classes.index(c) for c in classes])
    real = real_images(args.real, args.split, classes)
    real_features = {c: measure(x, classifier)[0] for c, x in real.items()}

    variants = {}
    net = build_generator(config)
    net.load_state_dict(state["trainer"]["generator_ema"])
    variants["copy"] = net.eval()
    standing = copy.deepcopy(net)
    started = time.perf_counter()
    standing_statistics(standing, images=args.standing_images)
    standing_seconds = time.perf_counter() - started
    variants["standing"] = standing.eval()

    labels = np.repeat(np.arange(len(classes)), args.samples)
    seeds = np.arange(len(labels)) + 10**6
    rows, generate_seconds = {}, 0.0
    for name, generator in variants.items():
        started = time.perf_counter()
        images = generate(generator, labels, seeds, batch_size=64)
        generate_seconds = time.perf_counter() - started
        feats, guesses = measure(images, classifier)
        consistency, fdd = {}, {}
        for k, c in enumerate(classes):
            mine = labels == k
            consistency[c] = float((guesses[mine] == position[k]).mean())
            n = min(int(mine.sum()), len(real_features.get(c, [])))
            if n >= 2:
                a, b = real_features[c][:n], feats[mine][:n]
                fdd[c] = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        rows[name] = (consistency, fdd)

    print(f"Checkpoint {latest.uri} (step {state['step']}); {args.samples} images per class, the "
          f"same seeds for both; real split {args.split!r}; classifier {classifier.sha256[:12]}.\n")
    print("| G_ema BatchNorm statistics | mean class-consistency | " + " | ".join(classes)
          + " | mean FDD |")
    print("|---|---:|" + "---:|" * len(classes) + "---:|")
    for name, (consistency, fdd) in rows.items():
        print(f"| {name} | {np.mean(list(consistency.values())):.3f} | "
              + " | ".join(f"{consistency[c]:.2f}" for c in classes)
              + f" | {np.mean(list(fdd.values())):.2f} |")
    print("\nPer-class FDD: " + "; ".join(
        f"{name}: " + ", ".join(f"{c} {v:.1f}" for c, v in fdd.items()) for name, (_, fdd) in rows.items()))
    print(f"Cost: standing statistics over {args.standing_images} images {standing_seconds:.2f} s, "
          f"{standing_seconds / generate_seconds:.2f}x the generation of the "
          f"{len(labels)}-image evaluation set ({generate_seconds:.2f} s) in the same run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

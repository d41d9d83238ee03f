"""Does the demo GAN obey its condition, and how fast? Class-consistency against training steps.

    python benchmarks/condition_consistency.py --real demo_output/real \
        --classifier demo_output/classifier/classifier --steps 1500

Trains the ``demo`` preset in-process (no Ray) on the real shards' train split with
class-balanced batches, once per arm, and every ``--eval-every`` steps measures the
class-consistency of G_ema's images: ``--samples`` images of each of the 9 classes, the share the
classifier artifact (``jobs/train_classifier.py``) puts in the asked-for class. Chance is 1/9.

Arms (all else equal, same seed; they run side by side, one process and one torch thread each,
so both see the same machine load):

- ``eq5``: the discriminator loss exactly as the paper prints it (``gan.mismatch_weight=0``);
- ``mismatched``: plus StackGAN++'s mismatched pairs (``gan.mismatch_weight=1``), the demo preset.

``--arm NAME=KEY=VALUE[,KEY=VALUE]`` replaces the arms (e.g. ``--arm lr1e-4=gan.lr_g=1e-4``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.gan.config import load_config, parse_overrides  # noqa: E402
from cxrfactory.models import build_discriminators, build_generator, to_uint8  # noqa: E402
from cxrfactory.classifier.artifact import load_classifier_artifact, read_classifier_config  # noqa: E402
from cxrfactory.models.densenet import preprocess  # noqa: E402
from cxrfactory.images import decode_png  # noqa: E402
from cxrfactory.shards import list_shards, read_manifest, read_shard  # noqa: E402
from cxrfactory.storage import StorageError, check_readable, resolve  # noqa: E402
from cxrfactory.gan.step import GANTrainer  # noqa: E402

DEFAULT_ARMS = {"eq5": "gan.mismatch_weight=0", "mismatched": "gan.mismatch_weight=1"}


def load_split(root: str, split: str, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of ``split`` as float (N, 1, R, R) in [-1, 1] and class indices (N,)."""
    loc = resolve(root)
    images, labels = [], []
    for path in list_shards(loc):
        for row in read_shard(loc.join(path), columns=["image", "label", "split"]).to_pylist():
            if row["split"] == split and row["label"] in classes:
                images.append(decode_png(row["image"]["bytes"]))
                labels.append(classes.index(row["label"]))
    if not images:
        raise SystemExit(f"error: {root} has no {split} images of {classes}")
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1.0)[:, None]
    return x, torch.tensor(labels)


def run_arm(name: str, overrides: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config = load_config("demo").with_overrides(parse_overrides(overrides.split(",")))
    classes = list(config.model.classes)
    images, labels = load_split(args.real, "train", classes)
    if images.shape[-1] != config.model.resolution:
        raise SystemExit(f"error: shards are {images.shape[-1]} px, the demo preset makes {config.model.resolution}")
    classifier = load_classifier_artifact(args.classifier)
    position = torch.tensor([classifier.classes.index(c) for c in classes])
    torch.manual_seed(args.seed)
    trainer = GANTrainer(build_generator(config), build_discriminators(config), config.gan, seed=args.seed)
    rng = torch.Generator().manual_seed(args.seed)
    members = [torch.nonzero(labels == k).flatten() for k in range(len(classes))]
    batch = config.train.batch_size
    steps_per_epoch = max(1, len(images) // batch)
    asked = torch.arange(len(classes)).repeat_interleave(args.samples)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        if (step - 1) % steps_per_epoch == 0:
            trainer.set_epoch((step - 1) // steps_per_epoch)
        # Class-balanced batch, as the training loop's class_balanced epochs.
        wanted = torch.randint(0, len(classes), (batch,), generator=rng)
        idx = torch.stack([members[k][torch.randint(0, len(members[k]), (1,), generator=rng)][0]
                           for k in wanted.tolist()])
        trainer.train_step(images[idx], F.one_hot(labels[idx], len(classes)).float())
        if step % args.eval_every == 0 or step == args.steps:
            fake = trainer.sample(F.one_hot(asked, len(classes)).float())[-1]
            with torch.inference_mode():
                guess = classifier.model(preprocess(to_uint8(fake), classifier.preprocessing)).argmax(1)
            hits = (guess == position[asked]).float().view(len(classes), args.samples).mean(1)
            point = {"step": step, "seconds": round(time.perf_counter() - start, 1),
                     "mean": round(float(hits.mean()), 3),
                     "per_class": {c: round(float(h), 2) for c, h in zip(classes, hits)}}
            curve.append(point)
            print(f"{name}: {json.dumps(point)}", flush=True)
    return {"arm": name, "overrides": overrides, "curve": curve}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="real shard root at the demo's 64 px (jobs/ingest_nih.py)")
    p.add_argument("--classifier", required=True, help="classifier artifact folder (jobs/train_classifier.py)")
    p.add_argument("--steps", type=int, default=1500, help="train_step calls per arm")
    p.add_argument("--eval-every", type=int, default=500, help="steps between measurements")
    p.add_argument("--samples", type=int, default=50, help="generated images per class per measurement")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="an arm: NAME=KEY=VALUE[,KEY=VALUE] over the demo preset (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the curves here")
    args = p.parse_args(argv)
    if min(args.steps, args.eval_every, args.samples, args.threads) < 1:
        p.error("--steps, --eval-every, --samples and --threads must be >= 1")
    arms = dict(DEFAULT_ARMS)
    if args.arm:
        pairs = [a.partition("=") for a in args.arm]
        if any(not name or not over or "=" not in over for name, _, over in pairs):
            p.error(f"--arm takes NAME=KEY=VALUE[,KEY=VALUE], got {args.arm}")
        arms = {name: over for name, _, over in pairs}
    # Everything a worker would trip over, checked here: one clear line instead of a traceback
    # from a pool process minutes later.
    for name, over in arms.items():
        try:
            load_config("demo").with_overrides(parse_overrides(over.split(",")))
        except ValueError as error:
            p.error(f"--arm {name}: {error}")
    try:
        check_readable(resolve(args.real), "real shard folder")
        read_manifest(resolve(args.real))
        read_classifier_config(args.classifier)
    except (ValueError, OSError, StorageError) as error:
        p.error(str(error))
    # spawn: each arm a fresh interpreter with its own torch thread pool.
    with multiprocessing.get_context("spawn").Pool(len(arms)) as pool:
        results = pool.starmap(run_arm, [(name, over, args) for name, over in arms.items()])
    last = {r["arm"]: r["curve"][-1] for r in results}
    for name, point in last.items():
        print(f"{name:>12}: mean class-consistency {point['mean']:.3f} at step {point['step']} "
              f"({point['seconds']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

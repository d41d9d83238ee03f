"""Does a short CPU run learn the condition on phantoms? Cardiomegaly vs Normal, by measured CTR.

    python benchmarks/learn_condition.py                  # 32 px, 16/32-px branches
    python benchmarks/learn_condition.py --steps 1500 --seed 1

Renders class-balanced Normal and Cardiomegaly phantoms (``cxrfactory.data.phantom``), trains
the multi-scale conditional GAN (demo widths, two branches: 16 and 32 px, the demo optimiser:
lr 2e-4, one D update per G update) through :class:`GANTrainer`, then measures the
cardiothoracic ratio (``phantom_measure.measure``) of G_ema's images per condition.

Baseline, in the same run: the same training with the labels shuffled against the images, so
the condition carries no information. Learning the condition means: generated Cardiomegaly has a
larger CTR than generated Normal, and "CTR > 0.5 <=> Cardiomegaly" classifies the conditioned
run's images far above the shuffled baseline's chance level. Real phantoms at the same
resolution give the ceiling.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.gan.config import GANConfig, ModelConfig  # noqa: E402
from cxrfactory.data.phantom import sample_specs  # noqa: E402
from cxrfactory.data.phantom_measure import measure  # noqa: E402
from cxrfactory.data.phantom_render import render  # noqa: E402
from cxrfactory.models import build_discriminators, build_generator, to_uint8  # noqa: E402
from cxrfactory.gan.step import GANTrainer  # noqa: E402

CLASSES = ("Normal", "Cardiomegaly")


def _phantoms(n: int, resolution: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    specs = sample_specs(n, seed=seed, classes=CLASSES, balanced=True)
    images = np.stack([render(s, resolution) for s in specs]).astype(np.float32) / 127.5 - 1.0
    labels = torch.tensor([CLASSES.index(s.label) for s in specs])
    return torch.from_numpy(images)[:, None], labels


def _ctr_summary(images_uint8: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    ctr = np.array([measure(img)["ctr"] for img in images_uint8], dtype=np.float64)
    found = ~np.isnan(ctr)
    predicted = np.where(found, ctr > 0.5, labels == 0)  # no lungs found counts as a miss
    return {
        "ctr_normal": float(np.nanmean(ctr[labels == 0])) if found[labels == 0].any() else math.nan,
        "ctr_cardiomegaly": float(np.nanmean(ctr[labels == 1])) if found[labels == 1].any() else math.nan,
        "lungs_found": float(found.mean()),
        "accuracy_ctr_rule": float((predicted == (labels == 1)).mean()),
    }


def train(images: torch.Tensor, labels: torch.Tensor, *, steps: int, seed: int, shuffle: bool,
          batch: int = 32) -> GANTrainer:
    """A seeded run; ``shuffle`` pairs each image with a random label (the baseline)."""
    model = ModelConfig(classes=CLASSES, z_dim=32, ngf=32, ndf=16, num_branches=2,
                        base_resolution=images.shape[-1] // 2, num_residual=1, attention=True)
    gan = GANConfig(lr_g=2e-4, lr_d=2e-4, d_steps_per_g=1, ema_half_life_images=2_000.0,
                    tau_step=0.25, tau_every_epochs=1)
    torch.manual_seed(seed)
    trainer = GANTrainer(build_generator(model), build_discriminators(model), gan, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    train_labels = labels[torch.randperm(len(labels), generator=gen)] if shuffle else labels
    per_epoch = len(images) // batch
    for step in range(steps):
        if step % per_epoch == 0:
            trainer.set_epoch(step // per_epoch)
            order = torch.randperm(len(images), generator=gen)
        idx = order[(step % per_epoch) * batch:(step % per_epoch + 1) * batch]
        trainer.train_step(images[idx], F.one_hot(train_labels[idx], 2).float())
    return trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Does a short CPU GAN run learn Cardiomegaly vs Normal?")
    parser.add_argument("--resolution", type=int, default=32, help="top resolution (>= 32, power of two)")
    parser.add_argument("--images", type=int, default=1024, help="real phantoms to train on")
    parser.add_argument("--steps", type=int, default=1200, help="train_step calls (= G updates here)")
    parser.add_argument("--samples", type=int, default=128, help="generated images to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.resolution < 32 or args.resolution & (args.resolution - 1):
        parser.error("--resolution must be a power of two >= 32 (the phantom measurements' minimum)")
    if args.images < 64 or args.steps < 1 or args.samples < 2:
        parser.error("need --images >= 64, --steps >= 1, --samples >= 2")
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    images, labels = _phantoms(args.images, args.resolution, args.seed)
    held_out, held_labels = _phantoms(args.samples, args.resolution, args.seed + 10_000)
    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()},
                                  "render_s": time.perf_counter() - start}
    results["real"] = _ctr_summary(to_uint8(held_out), held_labels.numpy())
    sample_labels = torch.arange(args.samples) % 2
    for name, shuffle in (("conditioned", False), ("shuffled_baseline", True)):
        t0 = time.perf_counter()
        trainer = train(images, labels, steps=args.steps, seed=args.seed, shuffle=shuffle)
        train_s = time.perf_counter() - t0
        fake = trainer.sample(F.one_hot(sample_labels, 2).float())[-1]
        results[name] = {**_ctr_summary(to_uint8(fake), sample_labels.numpy()), "train_s": train_s}
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(f"real (held-out phantoms): {json.dumps(results['real'])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

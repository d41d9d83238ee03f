"""Training throughput: the Ray Train loop against the same GAN step in a plain loop.

Three measurements on the same shards, model, batch and torch threads, in one process:

1. ``plain``: ``GANTrainer.train_step`` in a single-process loop over the train split decoded
   into memory up front, class-balanced batches drawn with ``torch.multinomial``;
2. ``ray x1``: ``cxrfactory.gan.loop.train`` with one worker (Ray Data decodes, draws
   and shuffles while the worker trains), the same torch threads;
3. ``ray x2``: two workers, the same threads each (the same global batch, half per worker).

Throughput is real images per second over the steps after ``--warmup``, from the loop's own
``metrics.jsonl`` (Ray) or ``perf_counter`` (plain); start-up (Ray, workers, the first epoch's
pipeline) is excluded and reported separately as the run's wall time. ``step share`` is the
fraction of the Ray worker's time spent inside ``train_step`` (the rest: waiting for data,
metrics, collectives), which a shared machine's load skews far less. Rounds alternate
plain, ray x1, ray x2, plain, ...; each Ray run is compared with the mean of the plain runs
around it, so drift in a shared machine's load cancels as far as it can.

    python benchmarks/bench_train.py [--preset demo] [--steps 40] [--warmup 10] [--threads 1]
        [--images-per-class 200] [--rounds 2] [--data SHARDS]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.gan.config import load_config  # noqa: E402
from cxrfactory.labels import DEFAULT_CLASSES  # noqa: E402
from cxrfactory.models import build_discriminators, build_generator  # noqa: E402
from cxrfactory.gan.data import load_split_tensors  # noqa: E402
from cxrfactory.gan.step import GANTrainer  # noqa: E402


def make_shards(out: Path, per_class: int, resolution: int) -> str:
    """Noise images in NIH's layout (brightness codes the class), ingested at ``resolution``."""
    from cxrfactory.data.nih import IngestConfig, ingest

    nih = out / "nih"
    (nih / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for ci, label in enumerate(DEFAULT_CLASSES):
        for k in range(per_class):
            pid = 1 + ci * per_class + k
            name = f"{pid:08d}_000.png"
            Image.fromarray((rng.random((resolution, resolution)) * 60 + ci * 20).astype(np.uint8), "L").save(
                nih / "images" / name)
            rows.append({"Image Index": name, "Finding Labels": "No Finding" if label == "Normal" else label,
                         "Patient ID": pid})
    pd.DataFrame(rows).to_csv(nih / "Data_Entry_2017.csv", index=False)
    ingest(IngestConfig(nih_root=str(nih), out=str(out / "shards"), resolution=resolution), log=lambda s: None)
    return str(out / "shards")


def plain_loop(config, data: str, steps: int, warmup: int, threads: int) -> float:
    """Images/s of GANTrainer.train_step over in-memory tensors, class-balanced batches."""
    torch.set_num_threads(threads)
    images, labels = load_split_tensors(data, config.model.classes, config.resolutions)
    weights = 1.0 / torch.bincount(labels, minlength=config.model.num_classes).float()[labels]
    torch.manual_seed(config.train.seed)
    trainer = GANTrainer(build_generator(config), build_discriminators(config), config.gan)
    gen = torch.Generator().manual_seed(config.train.seed)
    batch = config.train.batch_size
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        idx = torch.multinomial(weights, batch, replacement=True, generator=gen)
        c = torch.nn.functional.one_hot(labels[idx], config.model.num_classes).float()
        trainer.train_step([x[idx] for x in images], c)
    return steps * batch / (time.perf_counter() - start)


def ray_loop(config, data: str, storage: str, name: str, steps: int, warmup: int,
             workers: int, threads: int) -> tuple[float, float, float]:
    """(steady images/s after warm-up, mean step share after warm-up, wall seconds of the run)."""
    from cxrfactory.gan.loop import RunOptions, train

    log_every = 5
    config = config.with_overrides({"train.num_workers": workers, "train.max_steps": warmup + steps,
                                    "train.log_every_images": log_every * config.train.batch_size,
                                    "train.checkpoint_every_images": 10**9})
    started = time.perf_counter()
    train(config, RunOptions(data=data, run_name=name, storage=storage, torch_threads=threads),
          log=lambda s: None)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (Path(storage) / name / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["step"] >= warmup)
    last = records[-1]
    rate = (last["images"] - first["images"]) / (last["elapsed_s"] - first["elapsed_s"])
    timed = [r for r in records if r["step"] > warmup]
    share = sum(r["step_share"] for r in timed) / len(timed)
    return rate, share, wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (a multiple of 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the plain loop and of each worker")
    p.add_argument("--images-per-class", type=int, default=200, help="generated shards: images per class")
    p.add_argument("--data", default=None, help="real shards to use instead of generated ones")
    p.add_argument("--rounds", type=int, default=2, help="plain, ray x1, ray x2 rounds (plain once more at the end)")
    args = p.parse_args(argv)
    if args.warmup % 5 or args.steps % 5:
        p.error("--warmup and --steps must be multiples of 5 (the Ray runs log every 5 steps)")

    from cxrfactory.runtime import init_ray

    config = load_config(args.preset).with_overrides({"train.use_gpu": False})
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_shards(Path(tmp), args.images_per_class, config.model.resolution)
        init_ray()
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False
        print(f"preset {args.preset}: {config.resolutions} px, batch {config.train.batch_size}, "
              f"{args.steps} timed steps after {args.warmup}, {args.threads} torch thread(s) per process, "
              f"{args.rounds} round(s)")
        plain = [plain_loop(config, data, args.steps, args.warmup, args.threads)]
        rows = [("plain", 0, 1, plain[0], None, None)]
        for r in range(1, args.rounds + 1):
            for workers in (1, 2):
                rate, share, wall = ray_loop(config, data, str(Path(tmp) / "runs"), f"bench-r{r}-x{workers}",
                                             args.steps, args.warmup, workers, args.threads)
                rows.append((f"ray x{workers}", r, workers, rate, share, wall))
            plain.append(plain_loop(config, data, args.steps, args.warmup, args.threads))
            rows.append(("plain", r, 1, plain[-1], None, None))
    # Each Ray run is compared with the mean of the plain runs just before and after it.
    print(f"\n{'loop':<8} {'round':>5} {'workers':>7} {'img/s':>8} {'vs plain':>8} {'step share':>10} {'run wall s':>10}")
    ratios: dict[int, list[float]] = {1: [], 2: []}
    for name, r, workers, rate, share, wall in rows:
        ratio = ""
        if name != "plain":
            ratios[workers].append(rate / ((plain[r - 1] + plain[r]) / 2))
            ratio = f"{ratios[workers][-1]:.2f}"
        print(f"{name:<8} {r:>5} {workers:>7} {rate:>8.1f} {ratio:>8} "
              f"{'' if share is None else f'{share:.2f}':>10} {'' if wall is None else f'{wall:.0f}':>10}")
    for workers, values in ratios.items():
        print(f"ray x{workers} / plain: median {statistics.median(values):.2f} over {len(values)} round(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

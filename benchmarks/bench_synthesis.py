"""Synthesis throughput and memory: the Ray Data pipeline against a bare loop of the same generator.

    python benchmarks/bench_synthesis.py throughput [--preset demo] [--per-class 1000] [--classes 2]
    python benchmarks/bench_synthesis.py memory [--sizes 1000 10000]
    python benchmarks/bench_synthesis.py gpu [--preset paper] [--per-class 2000]

``throughput`` (CPU): images/s of (a) the bare loop, ``sampling.generate`` on the same seeds and
the same torch threads, nothing encoded or written; (b) the pipeline's actor class run in this
process (generate + resize + PNG + Parquet + atomic write, no Ray); (c) the whole Ray pipeline,
one actor with the same threads, actor start-up included. The bare loop runs before and after
(b, c); ratios are against the mean of the two.

``memory``: peak RSS of the driver and of the generator actor for each images-per-class size, each
size in a fresh process (one class), to show memory does not grow with N.

``gpu``: (a) and (b) on CUDA, without Ray (the GPU machine has no Ray), for the projection of a
20,000-per-class x 9-class run on one GPU; also checks that another batch size changes a pixel by
at most one grey level on the GPU.

The generator has the preset's architecture and random weights scaled by 2 (see ``--scale``):
at initialisation its images are flat grey, which PNG compresses to almost nothing and would make
encoding look cheaper than it is on real, textured X-rays.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxrfactory.gan.artifact import GeneratorArtifact, save_generator_artifact  # noqa: E402
from cxrfactory.gan.config import load_config  # noqa: E402
from cxrfactory.models import build_generator, generate  # noqa: E402
from cxrfactory.synthesis import (  # noqa: E402
    ShardWriter, SynthesisConfig, image_seeds, plan_classes, plan_work, prepare_synthesis,
    run_synthesis,
)
from cxrfactory.synthesis.pipeline import peak_rss_mb  # noqa: E402

TOTAL_IMAGES = 20_000 * 9  # the product's headline run


def make_generator(preset: str, scale: float, dest: Path) -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    config = load_config(preset)
    net = build_generator(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.mul_(scale)
    return net, save_generator_artifact(str(dest), net, config)


class Clock:
    """Wall and CPU time (this process, all threads) of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bare_loop(net, n_classes: int, per_class: int, batch_size: int, device: str) -> tuple[float, float]:
    """(images/s, images per CPU-second) of sampling.generate on the pipeline's own seeds;
    nothing encoded or written."""
    with Clock() as clock:
        for k in range(n_classes):
            generate(net, [k] * per_class, image_seeds(0, k, 0, per_class), batch_size=batch_size,
                     device=device)
        if device == "cuda":
            torch.cuda.synchronize()
    return n_classes * per_class / clock.wall, n_classes * per_class / clock.cpu


def writer_in_process(net, sha: str, classes, per_class: int, args, out: Path,
                      device: str) -> tuple[float, float, float]:
    """(images/s, images per CPU-second) of the pipeline's actor class run here, and the mean
    PNG size in bytes."""
    import pyarrow.parquet as pq

    artifact = GeneratorArtifact(net, load_config(args.preset), sha, {})
    writer = ShardWriter(artifact=artifact, out=str(out), s3_endpoint=None, seed=0,
                         resolution=net.resolutions[-1], batch_size=args.batch_size,
                         threads=args.threads, use_gpu=device == "cuda")
    items = plan_work(plan_classes(classes, load_config(args.preset).model.classes, per_class),
                      args.rows_per_file)
    with Clock() as clock:
        for item in items:
            writer({k: np.array([getattr(item, k)]) for k in ("path", "label", "class_index", "start", "stop")})
    sizes = [len(b) for p in out.glob("train/*/*.parquet")
             for b in pq.read_table(p, columns=["image"]).column("image").combine_chunks().field("bytes").to_pylist()]
    n = len(classes) * per_class
    return n / clock.wall, n / clock.cpu, float(np.mean(sizes))


def throughput(args) -> None:
    import ray

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        net, sha = make_generator(args.preset, args.scale, tmp / "generator")
        classes = load_config(args.preset).model.classes[: args.classes]
        generate(net, [0] * args.batch_size, list(range(args.batch_size)), batch_size=args.batch_size)  # warm-up
        bare_before = bare_loop(net, len(classes), args.per_class, args.batch_size, "cpu")
        inproc = writer_in_process(net, sha, classes, args.per_class, args, tmp / "inproc", "cpu")

        ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        config = SynthesisConfig(generator=str(tmp / "generator"), out=str(tmp / "ray"),
                                 target_per_class=args.per_class, classes=classes,
                                 batch_size=args.batch_size, rows_per_file=args.rows_per_file,
                                 workers=1, cpus_per_worker=args.threads)
        run = prepare_synthesis(config, log=lambda _: None)
        with Clock() as clock:
            run_synthesis(run, log=lambda _: None)
        stats = run.stats
        ray.shutdown()
        torch.set_num_threads(args.threads)  # the in-process writer is gone; restore ours
        bare_after = bare_loop(net, len(classes), args.per_class, args.batch_size, "cpu")

    n = len(classes) * args.per_class
    bare = [(x + y) / 2 for x, y in zip(bare_before, bare_after)]
    ray_wall, ray_cpu = n / clock.wall, n / (clock.cpu + stats.worker_cpu_seconds)
    print(f"preset={args.preset} classes={len(classes)} per_class={args.per_class} "
          f"threads={args.threads} batch={args.batch_size} rows_per_file={args.rows_per_file} "
          f"png_bytes/image={inproc[2]:.0f}")
    print(f"{'':34}{'images/s':>10}{'ratio':>8}{'images/CPU-s':>14}{'ratio':>8}")
    for name, wall, cpu in (("bare loop (generate only)", *bare),
                            ("actor class in-process, no Ray", *inproc[:2]),
                            ("Ray pipeline end to end", ray_wall, ray_cpu)):
        print(f"{name:34}{wall:10.1f}{wall / bare[0]:8.3f}{cpu:14.1f}{cpu / bare[1]:8.3f}")
    print(f"bare loop before/after: {bare_before[0]:.1f}/{bare_after[0]:.1f} images/s; Ray: "
          f"{clock.wall:.1f}s wall, actor busy {stats.worker_seconds:.1f}s "
          f"({n / stats.worker_seconds:.1f} images/s), CPU-s driver {clock.cpu:.1f} + actor "
          f"{stats.worker_cpu_seconds:.1f} (start-up included)")


def memory_one(args) -> None:
    """One size, in this (fresh) process: prints a JSON line."""
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_generator(args.preset, args.scale, tmp / "generator")
        ray.init(num_cpus=args.threads, include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        config = SynthesisConfig(generator=str(tmp / "generator"), out=str(tmp / "ray"),
                                 target_per_class=args.per_class, classes=("Effusion",),
                                 batch_size=args.batch_size, rows_per_file=args.rows_per_file,
                                 workers=1, cpus_per_worker=args.threads)
        run = prepare_synthesis(config, log=lambda _: None)
        run_synthesis(run, log=lambda _: None)
        print(json.dumps({"per_class": args.per_class, "driver_peak_mb": round(peak_rss_mb(), 1),
                          "actor_peak_mb": round(run.stats.peak_worker_rss_mb, 1),
                          "images_per_s": round(run.stats.images_per_second, 1)}))
        ray.shutdown()


def memory(args) -> None:
    results = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "memory-one", "--per-class", str(size), "--preset", args.preset,
               "--threads", str(args.threads), "--batch-size", str(args.batch_size),
               "--rows-per-file", str(args.rows_per_file)]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        print(line, flush=True)
    small, large = results[0], results[-1]
    for key in ("driver_peak_mb", "actor_peak_mb"):
        print(f"{key}: {small[key]} -> {large[key]} MiB, ratio {large[key] / small[key]:.3f} "
              f"({large['per_class'] // small['per_class']}x the images)")


def encode_rates(images: np.ndarray, threads: int) -> tuple[float, float]:
    """PNG encodings/s of ``images`` on one thread and on a pool of ``threads`` (GIL-bound or not)."""
    from concurrent.futures import ThreadPoolExecutor

    from cxrfactory.images import encode_png

    started = time.perf_counter()
    for img in images:
        encode_png(img)
    serial = len(images) / (time.perf_counter() - started)
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(encode_png, images))
        pooled = len(images) / (time.perf_counter() - started)
    return serial, pooled


def gpu(args) -> None:
    assert torch.cuda.is_available(), "the gpu mode needs CUDA"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        net, sha = make_generator(args.preset, args.scale, tmp / "generator")
        net = net.cuda()
        classes = load_config(args.preset).model.classes[: args.classes]
        print(f"device={torch.cuda.get_device_name()} preset={args.preset} "
              f"resolution={net.resolutions[-1]} classes={len(classes)} per_class={args.per_class} "
              f"batch={args.batch_size} rows_per_file={args.rows_per_file} cpu_threads={args.threads}")
        seeds = image_seeds(0, 1, 0, 256)
        a = generate(net, [1] * 256, seeds, batch_size=args.batch_size, device="cuda")
        b = generate(net, [1] * 256, seeds, batch_size=7, device="cuda")
        diff = np.abs(a.astype(int) - b.astype(int))
        print(f"batch {args.batch_size} vs 7 on GPU: max |diff| {diff.max()} grey levels, "
              f"{(diff > 0).mean() * 100:.4f}% of pixels differ")
        torch.set_num_threads(args.threads)
        bare_before = bare_loop(net, len(classes), args.per_class, args.batch_size, "cuda")[0]
        inproc, _, png_bytes = writer_in_process(net.cpu(), sha, classes, args.per_class, args,
                                                 tmp / "inproc", "cuda")
        net = net.cuda()
        bare_after = bare_loop(net, len(classes), args.per_class, args.batch_size, "cuda")[0]
        encode_serial, encode_threads = encode_rates(a, args.threads)
    bare = (bare_before + bare_after) / 2
    print(f"png_bytes/image={png_bytes:.0f}; PNG encoding alone: {encode_serial:.0f} images/s on one "
          f"thread, {encode_threads:.0f} images/s on {args.threads} threads")
    print(f"bare loop (generate only)        {bare:8.1f} images/s  (before {bare_before:.1f}, after {bare_after:.1f})")
    print(f"actor class in-process, no Ray   {inproc:8.1f} images/s  ratio {inproc / bare:.3f}")
    print(f"projected {TOTAL_IMAGES} images on one GPU, one actor: {TOTAL_IMAGES / inproc / 60:.1f} min "
          f"(generation alone {TOTAL_IMAGES / bare / 60:.1f} min)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["throughput", "memory", "memory-one", "gpu"])
    p.add_argument("--preset", default=None, help="architecture preset (default demo; gpu: paper)")
    p.add_argument("--per-class", type=int, default=None, help="images per class")
    p.add_argument("--classes", type=int, default=2, help="how many classes (vocabulary order)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="memory: images per class")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the bare loop and of the actor (default 1: stable timings "
                        "on a shared machine; the gpu mode uses them for PNG encoding)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows-per-file", type=int, default=250)
    p.add_argument("--scale", type=float, default=2.0, help="multiplier of the random weights")
    args = p.parse_args(argv)
    args.preset = args.preset or ("paper" if args.mode == "gpu" else "demo")
    args.per_class = args.per_class or {"gpu": 2000, "throughput": 1000}.get(args.mode, 1000)
    {"throughput": throughput, "memory": memory, "memory-one": memory_one, "gpu": gpu}[args.mode](args)


if __name__ == "__main__":
    main()

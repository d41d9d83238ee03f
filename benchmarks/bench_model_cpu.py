"""CPU benchmark of the model on the ``demo`` preset (and the ``paper`` preset's size).

    python benchmarks/bench_model_cpu.py                 # demo: generation, iterations
    python benchmarks/bench_model_cpu.py --card          # paper preset: params, FLOPs, memory

``--threads 1 --clock process`` measures CPU seconds, which a busy shared machine disturbs far
less than wall time. Prints, for the demo preset (16/32/64 px) against the cDCGAN baseline at the same top
resolution (64 px), measured in the same run:

- generator images/s (eval mode, no grad, batch 64, float32);
- one iteration at batch 32 with the paper's schedule (5 D + 1 G updates) and with the demo's
  own schedule (1 D + 1 G), median and best of several.

``--card`` measures instead the paper preset's parameter counts, FLOPs per image and activation memory per
image (saved-for-backward bytes; see ``gpu_model.model_cost``), the numbers of
docs/model_card.md. Timings on a shared machine are noisy: each number is a median of repeats,
and the baseline runs interleaved with the model so both see the same load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

#: The clock every runner reads; ``--clock process`` swaps in CPU time (see main).
_clock = time.perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_model import model_cost  # noqa: E402

from cxrfactory.gan.config import Config, ConfigError, load_config, parse_overrides  # noqa: E402
from cxrfactory.models import build_discriminators, build_generator, count_parameters  # noqa: E402
from cxrfactory.gan.step import GANTrainer  # noqa: E402


def _generation_seconds(cfg: Config, batch: int) -> Callable[[], float]:
    torch.manual_seed(0)
    G = build_generator(cfg).eval()
    G.set_tau(1.0)
    c = F.one_hot(torch.arange(batch) % cfg.model.num_classes, cfg.model.num_classes).float()

    @torch.no_grad()
    def run() -> float:
        z = torch.randn(batch, cfg.model.z_dim)
        start = _clock()
        G(z, c)
        return _clock() - start

    return run


def _iteration_seconds(cfg: Config, batch: int, d_steps_per_g: int) -> Callable[[], float]:
    torch.manual_seed(0)
    gan = dataclasses.replace(cfg.gan, d_steps_per_g=d_steps_per_g)
    trainer = GANTrainer(build_generator(cfg), build_discriminators(cfg), gan)
    trainer.set_epoch(1000)  # tau at its maximum: attention on
    r = cfg.model.resolution
    real = torch.rand(batch, 1, r, r) * 2 - 1
    c = F.one_hot(torch.arange(batch) % cfg.model.num_classes, cfg.model.num_classes).float()

    def run() -> float:
        start = _clock()
        for _ in range(d_steps_per_g):
            trainer.train_step(real, c)
        return _clock() - start

    return run


def _interleaved(runs: dict[str, Callable[[], float]], repeats: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Call every runner in turn ``repeats`` times (after warm-up); median and best seconds."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: {"median_s": statistics.median(t), "best_s": min(t)} for name, t in times.items()}


def _demo_timings(repeats: int) -> dict[str, object]:
    """Demo preset vs the cDCGAN baseline: generation images/s, iteration seconds."""
    demo = load_config("demo")
    baseline = demo.with_overrides({"model.arch": "cdcgan"})
    results: dict[str, object] = {}
    results["params"] = {
        "demo_generator": count_parameters(build_generator(demo)),
        "demo_discriminators": [count_parameters(d) for d in build_discriminators(demo)],
        "cdcgan_generator": count_parameters(build_generator(baseline)),
    }
    gen_batch, batch = 64, 32
    gen = _interleaved(
        {"demo": _generation_seconds(demo, gen_batch), "cdcgan": _generation_seconds(baseline, gen_batch)},
        repeats,
    )
    results["generation_images_per_s"] = {k: gen_batch / v["median_s"] for k, v in gen.items()}
    results["generation_ratio_demo_over_cdcgan"] = (
        results["generation_images_per_s"]["demo"] / results["generation_images_per_s"]["cdcgan"]
    )
    for schedule in (5, 1):
        it = _interleaved(
            {"demo": _iteration_seconds(demo, batch, schedule), "cdcgan": _iteration_seconds(baseline, batch, schedule)},
            repeats,
        )
        results[f"iteration_{schedule}D+1G_b{batch}"] = it
        results[f"iteration_{schedule}D+1G_ratio_demo_over_cdcgan"] = it["demo"]["median_s"] / it["cdcgan"]["median_s"]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="CPU benchmark of the model (demo preset).")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per number")
    parser.add_argument("--card", action="store_true",
                        help="measure the paper preset's size (params, FLOPs, activations) instead")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                        help="overrides of the paper preset for --card, e.g. model.attention=false")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall time, or this process's CPU time (with --threads 1 on a busy "
                             "shared machine, CPU time is close to the wall time of an idle one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    if args.set and not args.card:
        parser.error("--set applies to --card only")
    torch.set_num_threads(args.threads)
    global _clock
    _clock = time.process_time if args.clock == "process" else time.perf_counter

    results: dict[str, object] = {"threads": args.threads, "clock": args.clock, "torch": torch.__version__,
                                  "load_average_at_start": os.getloadavg()}
    if args.card:
        try:
            paper = load_config("paper").with_overrides(parse_overrides(args.set))
        except ConfigError as err:
            parser.error(str(err))
        results["overrides"] = args.set
        results["paper"] = model_cost(paper, torch.device("cpu"))
        results["paper_cdcgan"] = model_cost(paper.with_overrides({"model.arch": "cdcgan"}), torch.device("cpu"))
    else:
        results.update(_demo_timings(args.repeats))
    for key, value in results.items():
        print(f"{key}: {json.dumps(value)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

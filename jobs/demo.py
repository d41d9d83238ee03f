"""The whole factory on phantom chest X-rays, on an embedded local Ray: `make demo`.

    python jobs/demo.py --out demo_output [--quick | --preset full|quick | --config FILE]
        [--set field=value ...]

phantoms -> ingest -> GAN training (the proposed model and the cDCGAN baseline) -> synthesis
(an evaluation set per model, a class-balanced set) -> DenseNet classifier -> FDD, KID,
precision/recall/density/coverage -> memorization audit -> downstream utility -> report. Each
stage is one of the project's jobs, run with the arguments printed before it, so every step can
be rerun by hand. Rerunning the demo resumes: finished stages find their outputs complete and skip ahead.
`--quick` shrinks every stage (the smoke variant the test suite runs, about two minutes). The
sizes are a DemoSize, from cxrfactory/configs/demo/ (full, quick) or --config FILE, then --set
(e.g. --set gan_steps=300).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.config import ConfigError, add_config_arguments, config_from_args, load_preset  # noqa: E402
from cxrfactory import filenames  # noqa: E402
from cxrfactory.runtime import init_ray, run_job  # noqa: E402

#: The preset kind (folder under cxrfactory/configs/) of demo sizes.
KIND = "demo"


@dataclass(frozen=True)
class DemoSize:
    """How big each stage is; `FULL` took 14.4 minutes on a 2-core CPU (the goal: at most 20)."""

    images: int  # phantom chest X-rays (NIH's class prevalence) ...
    min_per_class: int  # ... with at least this many of every class
    resolution: int  # px of phantoms, shards and the generator's top branch
    gan_steps: int  # generator training steps (global batches), the same budget for both models
    gan_preset: tuple[str, ...]  # extra train.py flags
    target_per_class: int  # real + synthetic rows per class after balancing (downstream utility)
    classifier: tuple[str, ...]  # train_classifier.py flags (also the utility stage's)
    eval_per_class: int  # synthetic images per class of each evaluation set (FDD, Table 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gan_preset", tuple(self.gan_preset))
        object.__setattr__(self, "classifier", tuple(self.classifier))
        for name in ("images", "min_per_class", "resolution", "gan_steps", "target_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_per_class < 2:  # FDD needs a covariance per class
            raise ConfigError(f"eval_per_class must be >= 2, got {self.eval_per_class}")


FULL = load_preset(DemoSize, KIND, "full")
QUICK = load_preset(DemoSize, KIND, "quick")


class Stage(NamedTuple):
    key: str  # what it makes (benchmarks/table1_phantoms.py picks stages by key)
    title: str
    module: str  # jobs/<module>.py
    argv: list[str]


def stages(out: Path, size: DemoSize) -> list[Stage]:
    """Every step of the chain, in order.

    Each generator makes two sets: an evaluation set of the same number of images for every
    class (FDD per class and class-consistency compare equal counts, Normal included) and, for
    the proposed model, the set that balances the real training split (downstream utility).
    """
    real, runs, syn = out / "real", out / "runs", out / "synthetic"
    gan = ["--data", str(real), "--storage", str(runs), *size.gan_preset, "--num-workers", "1",
           "--max-steps", str(size.gan_steps)]

    def evaluation_set(model: str) -> Stage:
        return Stage(f"eval-{model}", f"Synthesize {size.eval_per_class} images of every class ({model}, for FDD)", "synthesize",
                ["--generator", str(runs / model / "generator"), "--out", str(syn / model),
                 "--target-per-class", str(size.eval_per_class)])

    return [
        Stage("phantoms", "Phantom chest X-rays in NIH's layout", "make_phantoms",
         ["--out", str(out / "phantoms"), "--num-images", str(size.images),
          "--min-per-class", str(size.min_per_class), "--resolution", str(size.resolution)]),
        Stage("ingest", "Ingest to Parquet shards by split and class", "ingest_nih",
         ["--nih-root", str(out / "phantoms"), "--out", str(real),
          "--resolution", str(size.resolution), "--rows-per-file", "500"]),
        Stage("train-proposed", "Train the proposed multi-scale GAN with attention", "train", [*gan, "--run-name", "proposed"]),
        Stage("train-cdcgan", "Train the cDCGAN baseline (same budget)", "train", [*gan, "--run-name", "cdcgan", "--model", "cdcgan"]),
        evaluation_set("proposed"),
        evaluation_set("cdcgan"),
        Stage("balanced", "Synthesize the class-balanced training set (proposed)", "synthesize",
         ["--generator", str(runs / "proposed" / "generator"), "--out", str(syn / "proposed-balanced"),
          "--target-per-class", str(size.target_per_class), "--balance-against", str(real)]),
        Stage("classifier", "Train the DenseNet classifier on real X-rays (FDD's features)", "train_classifier",
         ["--real", str(real), "--out", str(out / "classifier"), *size.classifier]),
        Stage("fdd", "FDD, class-consistency, KID, precision/recall, near-copies per class (Table 1)", "fdd",
         ["--real", str(real), "--synthetic", f"proposed={syn / 'proposed'}",
          "--synthetic", f"cdcgan={syn / 'cdcgan'}", "--classifier",
          str(out / "classifier" / "classifier"), "--out", str(out / "fdd"),
          "--max-per-class", str(size.eval_per_class),
          "--metrics", "fdd", "class_consistency", "kid", "prdc", "memorization"]),
        Stage("audit", "Memorization audit: near-copies of training patients (proposed)", "audit",
         ["--real", str(real), "--synthetic", str(syn / "proposed"), "--classifier",
          str(out / "classifier" / "classifier"), "--out", str(out / "audit")]),
        Stage("utility", "Downstream utility: real only vs real + synthetic", "evaluate_utility",
         ["--real", str(real), "--synthetic", str(syn / "proposed-balanced"), "--out", str(out / "utility"),
          "--target-per-class", str(size.target_per_class), *size.classifier]),
        Stage("report", "Report", "report",
         ["--out", str(out / "report"), "--run", str(runs / "proposed"),
          "--baseline-run", str(runs / "cdcgan"), "--real", str(real),
          "--synthetic", f"proposed={syn / 'proposed'}", "--synthetic", f"cdcgan={syn / 'cdcgan'}",
          "--balanced", f"proposed={syn / 'proposed-balanced'}",
          "--fdd", str(out / "fdd"), "--utility", str(out / "utility" / filenames.UTILITY),
          "--audit", str(out / "audit")]),
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output", help="folder for everything the demo makes")
    add_config_arguments(p, KIND, default="full")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the quick preset): the whole chain in ~2 minutes")
    return p


def resolve_size(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DemoSize:
    """The preset (--quick: quick, else full) or --config FILE, then --set."""
    if args.quick and (args.config or args.preset not in (None, "quick")):
        parser.error("--quick is the quick preset; drop --preset / --config")
    return config_from_args(parser, args, DemoSize, kind=KIND, default="quick" if args.quick else "full")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    size = resolve_size(args, parser)
    out = Path(args.out).absolute()
    init_ray()
    started = time.time()
    steps = stages(out, size)
    for number, (_, title, module, job_argv) in enumerate(steps, 1):
        print(f"\n=== [{number}/{len(steps)}] {title}  ({time.time() - started:.0f}s)\n"
              f"$ python jobs/{module}.py {shlex.join(job_argv)}", flush=True)
        job = importlib.import_module(f"jobs.{module}")
        code = job.main(job_argv)
        if code:
            print(f"error: stage {number} ({module}) failed with exit status {code}", file=sys.stderr)
            return code
    # The report stage has just printed the summary (FDD, class-consistency, utility).
    print(f"\n=== Done in {(time.time() - started) / 60:.1f} min. "
          f"Report: {out / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    run_job(main)

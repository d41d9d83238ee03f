"""The paper's Table 1 comparison reproduced on phantoms: proposed model vs cDCGAN, same budget.

    python benchmarks/table1_phantoms.py --out table1_run [--steps 1500] [--images 3000] [--seeds 1 2]

Runs the demo chain's stages up to FDD (phantoms, ingest, both GANs with the same number of
steps, an evaluation set of each, the DenseNet classifier, FDD) with the given budget, then
prints the FDD per class of both models and on how many classes the proposed model is lower
(the paper: 6 of 8 diseases). With several ``--seeds`` (the GANs' training seed; the data stay
the same) each seed runs in ``<out>/seed-<s>`` and a last table compares the seeds. Rerunning
resumes: finished stages are skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.runtime import init_ray  # noqa: E402
from jobs.demo import FULL, stages  # noqa: E402


def run_seed(out: Path, size) -> dict:
    """The chain up to FDD in ``out``; returns its fdd.json."""
    for key, title, module, job_argv in stages(out, size):
        if key in ("balanced", "utility", "report"):
            continue
        print(f"=== {title}", flush=True)
        if importlib.import_module(f"jobs.{module}").main(job_argv):
            raise SystemExit(f"error: stage {key} failed")
    print((out / "fdd" / "fdd.md").read_text())
    return json.loads((out / "fdd" / "fdd.json").read_text())


def comparison(result: dict) -> tuple[list[str], list[str]]:
    """(classes evaluated, classes where the proposed model's FDD is lower)."""
    fdd = {name: s["fdd"] for name, s in result["synthetic"].items()}
    classes = [c for c in result["classes"] if fdd["proposed"].get(c) is not None]
    return classes, [c for c in classes if fdd["proposed"][c] < fdd["cdcgan"][c]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the run")
    p.add_argument("--steps", type=int, default=FULL.gan_steps, help="GAN steps for each model")
    p.add_argument("--images", type=int, default=FULL.images, help="phantom images")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="GAN training seeds, one chain each (default: the preset's seed, one chain)")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    init_ray()
    results = {}
    for seed in args.seeds or [None]:
        preset = FULL.gan_preset + (() if seed is None else ("--seed", str(seed)))
        size = dataclasses.replace(FULL, gan_steps=args.steps, images=args.images, gan_preset=preset)
        results[seed] = run_seed(out if seed is None else out / f"seed-{seed}", size)
    print("seed  classes proposed lower  diseases  mean FDD proposed / cDCGAN  consistency proposed / cDCGAN")
    for seed, result in results.items():
        classes, wins = comparison(result)
        diseases = [c for c in classes if c != "Normal"]
        rows = result["synthetic"]
        print(f"{'-' if seed is None else seed:>4}  {len(wins)} of {len(classes):<14}"
              f"{len([c for c in wins if c != 'Normal'])} of {len(diseases):<4}"
              f"{rows['proposed']['fdd_mean']:>10.1f} / {rows['cdcgan']['fdd_mean']:<14.1f}"
              f"{rows['proposed']['class_consistency_mean']:.3f} / {rows['cdcgan']['class_consistency_mean']:.3f}"
              f"   lower on: {', '.join(wins)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

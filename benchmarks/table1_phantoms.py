"""The paper's Table 1 comparison reproduced on phantoms: proposed model vs cDCGAN, same budget.

    python benchmarks/table1_phantoms.py --out table1_run [--steps 2000] [--images 3000]

Runs the demo chain's stages up to FDD (phantoms, ingest, both GANs with the same number of
steps, an evaluation set of each, the DenseNet classifier, FDD) with the given budget, then
prints the FDD per class of both models and on how many classes the proposed model is lower
(the paper: 6 of 8 diseases). Rerunning resumes: finished stages are skipped.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the run")
    p.add_argument("--steps", type=int, default=FULL.gan_steps, help="GAN steps for each model")
    p.add_argument("--images", type=int, default=FULL.images, help="phantom images")
    args = p.parse_args(argv)
    size = dataclasses.replace(FULL, gan_steps=args.steps, images=args.images)
    out = Path(args.out).absolute()
    init_ray()
    for key, title, module, job_argv in stages(out, size):
        if key in ("balanced", "utility", "report"):
            continue
        print(f"=== {title}", flush=True)
        if importlib.import_module(f"jobs.{module}").main(job_argv):
            return 1
    result = json.loads((out / "fdd" / "fdd.json").read_text())
    print((out / "fdd" / "fdd.md").read_text())
    fdd = {name: s["fdd"] for name, s in result["synthetic"].items()}
    classes = [c for c in result["classes"] if fdd["proposed"].get(c) is not None]
    wins = [c for c in classes if fdd["proposed"][c] < fdd["cdcgan"][c]]
    diseases = [c for c in wins if c != "Normal"]
    print(f"proposed lower than cDCGAN on {len(wins)} of {len(classes)} classes: {', '.join(wins)} "
          f"({len(diseases)} of {len([c for c in classes if c != 'Normal'])} diseases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

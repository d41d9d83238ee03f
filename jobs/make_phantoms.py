"""Write a folder of procedural chest X-ray phantoms in NIH ChestX-ray14's layout.

    python jobs/make_phantoms.py --out DIR --num-images N [--resolution 256] [--seed 0]
        [--classes Normal Effusion ...] [--balanced | --min-per-class K] [--workers W]
    python jobs/make_phantoms.py --out DIR --metadata nih|CSV [--bbox CSV] [--num-images N]
    python jobs/make_phantoms.py --out DIR --smoke
    (each also takes --config FILE and --set KEY=VALUE, as every job with a config does)

The folder holds images/<Image Index>.png (8-bit grayscale), Data_Entry_2017.csv with NIH's
columns (written last: a folder with a CSV is complete) and phantom.json. Classes follow NIH's
single-label prevalence unless --balanced; --metadata renders one phantom per row of a NIH
metadata CSV ("nih": the real one shipped with the package), lesions placed by NIH's boxes.
The same seed gives the same bytes with any --workers. A rerun completes what is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.config import add_config_arguments, config_from_args  # noqa: E402
from cxrfactory.data import phantom as P  # noqa: E402
from cxrfactory.labels import DEFAULT_CLASSES, UnknownClassError  # noqa: E402
from cxrfactory.runtime import run_job  # noqa: E402

#: The --smoke run: every class twice, at 64 px.
SMOKE_IMAGES, SMOKE_RESOLUTION = 2 * len(DEFAULT_CLASSES), 64


def parse_args(argv=None) -> argparse.Namespace:
    # Flags without a given value stay None, so a --config file's value is not overridden by a
    # flag's default; the defaults named in the help are PhantomConfig's.
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (new, empty or a phantom folder)")
    p.add_argument("--num-images", type=int, default=None,
                   help="images to write (with --metadata: the first N rows; default all)")
    p.add_argument("--resolution", type=int, default=None, help="image side in px (default 256)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help=f"classes to draw (default all: {' '.join(DEFAULT_CLASSES)})")
    p.add_argument("--balanced", action="store_true", default=None, help="draw the classes evenly")
    p.add_argument("--min-per-class", type=int, default=None, metavar="K",
                   help="keep NIH's prevalence but give every class at least K images")
    p.add_argument("--metadata", default=None, metavar="CSV",
                   help="render one phantom per row of this NIH metadata csv[.gz]; "
                        "'nih' = the real one shipped with the package")
    p.add_argument("--bbox", default=None, metavar="CSV",
                   help="NIH BBox_List_2017 csv[.gz] for --metadata (default: the shipped one)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="rendering processes (default: the CPU count)")
    p.add_argument("--smoke", action="store_true",
                   help=f"a quick check: {SMOKE_IMAGES} balanced images at {SMOKE_RESOLUTION} px")
    add_config_arguments(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.num_images, args.resolution, args.balanced = SMOKE_IMAGES, SMOKE_RESOLUTION, True
    if args.workers < 1:
        p.error(f"--workers must be at least 1, got {args.workers}")
    flags = {name: getattr(args, name) for name in (
        "num_images", "resolution", "seed", "balanced", "min_per_class", "metadata", "bbox")}
    flags["classes"] = tuple(args.classes) if args.classes else None
    try:  # the config checks every value; a bad one is a usage error
        args.phantoms = config_from_args(p, args, P.PhantomConfig, flags=flags)
    except (P.PhantomError, UnknownClassError) as exc:
        p.error(str(exc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out, count = P.make_phantom_folder(args.out, args.phantoms, args.workers)
    seconds = time.perf_counter() - start
    print(f"wrote {count} phantoms of {args.phantoms.resolution} px to {out} in {seconds:.1f} s "
          f"({count / max(seconds, 1e-9):.0f} images/s, {args.workers} workers)")
    return 0


if __name__ == "__main__":
    run_job(main)

"""Per-class Fréchet DenseNet Distance of synthetic sets against a real split (the paper's Table 1).

    python jobs/fdd.py --real URI --synthetic NAME=URI [--synthetic NAME=URI ...]
        --classifier PATH --out DIR [--split test] [--classes CLASS ...]
        [--max-per-class N | --paper-protocol] [--real-stats FILE] [--cache-dir DIR]
        [--workers W] [--use-gpu | --no-use-gpu] [--batch-rows R] [--inference-batch B]
        [--s3-endpoint URL] [--smoke]

Writes <out>/fdd.json, fdd.csv and fdd.md: FDD per class (lower is better) for every synthetic
set, a real-vs-real floor (two patient-disjoint halves of the real split), the images per
class and class-consistency (the classifier's accuracy on each class's rows). The real side's
statistics are cached under <out>/cache (or --cache-dir) and reused by later runs with the same
real shards, split, sampling and classifier; --real-stats names the file explicitly, and one
made by another classifier is refused. --paper-protocol draws the paper's per-class counts
(Atelectasis 1000, ..., Pneumothorax 539) from every side, or the real split's count where it
holds fewer (with a warning naming those classes), so both sides of a distance are equal in
size; a synthetic set holding fewer is refused before any work. --classifier is the folder
jobs/train_classifier.py writes (<out>/classifier).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.metrics.fdd import FDDConfig, run_fdd  # noqa: E402
from cxrfactory.metrics.fdd_tables import format_markdown  # noqa: E402
from cxrfactory.runtime import init_ray, named_uris_or_exit, run_job  # noqa: E402

#: --smoke: a few images per class, enough to check the whole pipeline in seconds.
SMOKE_PER_CLASS = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="real shard folder or s3:// URI")
    p.add_argument("--synthetic", action="append", required=True, metavar="NAME=URI",
                   help="a synthetic shard set and its row name in the table (repeatable)")
    p.add_argument("--classifier", required=True, help="classifier artifact folder")
    p.add_argument("--out", required=True, help="output folder or s3:// URI")
    p.add_argument("--split", default="test", help="real split to compare against (default test)")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="classes to measure (default: every class all sets hold)")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--max-per-class", type=int, default=None, metavar="N",
                          help="at most N images per class and set (a fixed, hashed choice)")
    sampling.add_argument("--paper-protocol", action="store_true",
                          help="the paper's per-class counts, capped by what exists")
    sampling.add_argument("--smoke", action="store_true",
                          help=f"{SMOKE_PER_CLASS} images per class: checks the pipeline quickly")
    p.add_argument("--real-stats", default=None, metavar="FILE",
                   help="real-side statistics file: reused if present (must match), else written")
    p.add_argument("--cache-dir", default=None, help="folder of cached real-side statistics (default <out>/cache)")
    p.add_argument("--workers", type=int, default=None, help="feature actors (default: one per GPU, else 1)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU actors (default: when the cluster has GPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs (and torch threads) per actor")
    p.add_argument("--batch-rows", type=int, default=512, help="rows per actor call (one partial statistic each)")
    p.add_argument("--inference-batch", type=int, default=64, help="images per forward pass")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (else CXRF_S3_ENDPOINT / AWS)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("max_per_class", "workers", "batch_rows", "inference_batch"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "max_per_class" else 1):
            parser.error(f"--{flag.replace('_', '-')} is too small: {value}")
    if not Path(args.classifier).is_dir():
        parser.error(f"--classifier {args.classifier} is not a folder (expected the classifier "
                     "artifact jobs/train_classifier.py writes)")
    config = FDDConfig(
        real=args.real, synthetic=named_uris_or_exit(parser, args.synthetic), classifier=args.classifier,
        out=args.out, split=args.split, classes=tuple(args.classes) if args.classes else None,
        max_per_class=SMOKE_PER_CLASS if args.smoke else args.max_per_class,
        paper_protocol=args.paper_protocol, real_stats=args.real_stats, cache_dir=args.cache_dir,
        batch_rows=args.batch_rows, inference_batch=args.inference_batch, workers=args.workers,
        use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, s3_endpoint=args.s3_endpoint,
    )
    init_ray()
    print(format_markdown(run_fdd(config)))
    return 0


if __name__ == "__main__":
    run_job(main)

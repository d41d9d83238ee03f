"""Per-class Fréchet DenseNet Distance of synthetic sets against a real split (the paper's Table 1),
and the sample-level metrics beside it.

    python jobs/fdd.py --real URI --synthetic NAME=URI [--synthetic NAME=URI ...]
        --classifier PATH --out DIR [--split test] [--classes CLASS ...]
        [--metrics fdd class_consistency kid prdc memorization] [--bank-dir DIR]
        [--bootstrap-reps R] [--seed S]
        [--max-per-class N | --paper-protocol] [--real-stats FILE] [--cache-dir DIR]
        [--workers W] [--use-gpu | --no-use-gpu] [--batch-rows R] [--inference-batch B]
        [--s3-endpoint URL] [--smoke] [--config FILE] [--set field=value ...]

Writes <out>/fdd.json, fdd.csv and fdd.md: FDD per class (lower is better) for every synthetic
set, a real-vs-real floor (two patient-disjoint halves of the real split), the images per
class and class-consistency (the classifier's accuracy on each class's rows), and the metrics
of --metrics (default: fdd class_consistency kid prdc; memorization also embeds the real
training split): KID with its spread, precision/recall/density/coverage, FDD's excess over the
floor with a bootstrap interval, the share of near-copies of training images (jobs/audit.py
has the full audit). Each image is embedded once per classifier into a feature bank next to
its set (<set>/_features/, or --bank-dir for sets that cannot be written), which later runs
and the other metrics reuse. The real side's
statistics are cached under <out>/cache (or --cache-dir) and reused by later runs with the same
real shards, split, sampling and classifier; --real-stats names the file explicitly, and one
made by another classifier is refused. --paper-protocol draws the paper's per-class counts
(Atelectasis 1000, ..., Pneumothorax 539) from every side, or the real split's count where it
holds fewer (with a warning naming those classes), so both sides of a distance are equal in
size; a synthetic set holding fewer is refused before any work. --classifier is the folder
jobs/train_classifier.py writes (<out>/classifier). --config FILE (YAML/JSON) gives any FDDConfig
field; the flags override it and --set field=value overrides both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.config import add_config_arguments, config_from_args  # noqa: E402
from cxrfactory.metrics import registry  # noqa: E402
from cxrfactory.metrics.fdd import FDDConfig, prepare_fdd, run_fdd  # noqa: E402
from cxrfactory.metrics.fdd_tables import format_markdown  # noqa: E402
from cxrfactory.runtime import init_ray, named_uris_or_exit, run_job  # noqa: E402

#: --smoke: a few images per class, enough to check the whole pipeline in seconds.
SMOKE_PER_CLASS = 8


def build_parser() -> argparse.ArgumentParser:
    # Flags without a given value stay None, so a --config file's value is not overridden by a
    # flag's default; the defaults named in the help are FDDConfig's.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="real shard folder or s3:// URI")
    p.add_argument("--synthetic", action="append", required=True, metavar="NAME=URI",
                   help="a synthetic shard set and its row name in the table (repeatable)")
    p.add_argument("--classifier", required=True, help="classifier artifact folder or s3:// URI")
    p.add_argument("--out", required=True, help="output folder or s3:// URI")
    p.add_argument("--split", default=None, help="real split to compare against (default test)")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="classes to measure (default: every class all sets hold)")
    sampling = p.add_mutually_exclusive_group()
    sampling.add_argument("--max-per-class", type=int, default=None, metavar="N",
                          help="at most N images per class and set (a fixed, hashed choice)")
    sampling.add_argument("--paper-protocol", action="store_true", default=None,
                          help="the paper's per-class counts, capped by what exists")
    sampling.add_argument("--smoke", action="store_true",
                          help=f"{SMOKE_PER_CLASS} images per class: checks the pipeline quickly")
    p.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                   help=f"metrics by name, from: {', '.join(registry.METRICS)} (default: "
                        f"{' '.join(registry.DEFAULT)}; fdd and class_consistency always)")
    p.add_argument("--bank-dir", default=None,
                   help="folder for feature banks (default: <set>/_features next to each set)")
    p.add_argument("--bootstrap-reps", type=int, default=None,
                   help="resamples of FDD's excess-over-floor interval (default 100)")
    p.add_argument("--seed", type=int, default=None, help="seed of the bootstrap and KID subsets (default 0)")
    p.add_argument("--real-stats", default=None, metavar="FILE",
                   help="real-side statistics file: reused if present (must match), else written")
    p.add_argument("--cache-dir", default=None, help="folder of cached real-side statistics (default <out>/cache)")
    p.add_argument("--workers", type=int, default=None, help="feature actors (default: one per GPU, else 1)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU actors (default: when the cluster has GPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="Ray CPUs (and torch threads) per actor (default 1)")
    p.add_argument("--batch-rows", type=int, default=None,
                   help="rows per actor call (one partial statistic each; default 512)")
    p.add_argument("--inference-batch", type=int, default=None, help="images per forward pass (default 64)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (else CXRF_S3_ENDPOINT / AWS)")
    add_config_arguments(p)
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> FDDConfig:
    """--config FILE, then the flags given (--smoke: SMOKE_PER_CLASS per class), then --set."""
    for flag in ("max_per_class", "workers", "batch_rows", "inference_batch"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "max_per_class" else 1):
            parser.error(f"--{flag.replace('_', '-')} is too small: {value}")
    flags = {name: getattr(args, name) for name in (
        "real", "classifier", "out", "split", "classes", "paper_protocol", "real_stats", "cache_dir",
        "batch_rows", "inference_batch", "workers", "use_gpu", "cpus_per_worker", "s3_endpoint",
        "metrics", "bank_dir", "bootstrap_reps", "seed")}
    flags["synthetic"] = [list(pair) for pair in named_uris_or_exit(parser, args.synthetic)]
    flags["max_per_class"] = SMOKE_PER_CLASS if args.smoke else args.max_per_class
    return config_from_args(parser, args, FDDConfig, flags=flags)


def main(argv=None) -> int:
    parser = build_parser()
    config = resolve_config(parser.parse_args(argv), parser)
    inputs = prepare_fdd(config)  # the classifier and the manifests, before Ray starts
    init_ray()
    print(format_markdown(run_fdd(config, inputs=inputs)))
    return 0


if __name__ == "__main__":
    run_job(main)

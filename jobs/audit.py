"""Memorization audit: does a synthetic set copy the patients its generator was trained on?

    python jobs/audit.py --real URI --synthetic URI --classifier PATH --out DIR
        [--split train] [--held-out test] [--percentile 1.0] [--bank-dir DIR]
        [--workers W] [--use-gpu | --no-use-gpu] [--batch-rows R] [--inference-batch B]
        [--s3-endpoint URL] [--config FILE] [--set field=value ...]

For every image of --synthetic (any shard folder, real ones included; every row, whatever its
split), its nearest image of the real --split (train) in feature space (unit-length features of
--classifier) and in pixel space (32x32 thumbnails), and the same distances for the real
--held-out split (test): how close a new patient's image gets. An image is flagged as a
near-copy when, in either space, it is closer to a training image than the --percentile-th
percentile of the held-out distances; the share of held-out images the rule would flag
(cross-fitted over patient halves) is reported beside it. Writes <out>/audit.json (per-class
flag rates, distance distributions, the rule and its thresholds), <out>/flagged.parquet (one
row per flagged image: image_id, label, nearest_real_id, feature_distance, pixel_distance) and
<out>/closest.png (the closest pairs side by side). Features come from the feature banks
jobs/fdd.py also uses (built where missing). Make a clean set from the result with
jobs/synthesize.py --exclude-flagged <out>.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.config import add_config_arguments, config_from_args  # noqa: E402
from cxrfactory.metrics.audit import AuditConfig, run_audit  # noqa: E402
from cxrfactory.runtime import init_ray, run_job  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    # Flags without a given value stay None, so a --config file's value is not overridden by a
    # flag's default; the defaults named in the help are AuditConfig's.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="real shard folder or s3:// URI (training and held-out splits)")
    p.add_argument("--synthetic", required=True, help="the audited shard folder (synthetic or real)")
    p.add_argument("--classifier", required=True, help="classifier artifact folder or s3:// URI")
    p.add_argument("--out", required=True, help="output folder or s3:// URI")
    p.add_argument("--split", default=None, help="real split a copy would come from (default train)")
    p.add_argument("--held-out", default=None, help="real split of new patients (default test)")
    p.add_argument("--percentile", type=float, default=None,
                   help="flag below this percentile of the held-out distances (default 1.0)")
    p.add_argument("--bank-dir", default=None,
                   help="folder for feature banks (default: <set>/_features next to each set)")
    p.add_argument("--workers", type=int, default=None, help="feature actors (default: one per GPU, else 1)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU actors (default: when the cluster has GPUs)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="Ray CPUs (and torch threads) per actor (default 1)")
    p.add_argument("--batch-rows", type=int, default=None, help="rows per actor call (default 512)")
    p.add_argument("--inference-batch", type=int, default=None, help="images per forward pass (default 64)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (else CXRF_S3_ENDPOINT / AWS)")
    add_config_arguments(p)
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> AuditConfig:
    for flag in ("workers", "batch_rows", "inference_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    flags = {name: getattr(args, name) for name in (
        "real", "synthetic", "classifier", "out", "split", "held_out", "percentile", "bank_dir",
        "workers", "use_gpu", "cpus_per_worker", "batch_rows", "inference_batch", "s3_endpoint")}
    return config_from_args(parser, args, AuditConfig, flags=flags)


def main(argv=None) -> int:
    parser = build_parser()
    config = resolve_config(parser.parse_args(argv), parser)
    init_ray()
    run_audit(config)
    return 0


if __name__ == "__main__":
    run_job(main)

"""Downstream utility of synthetic data: the same classifier trained on real only and on real +
synthetic balanced to a target per class, both scored on the real test split.

    python jobs/evaluate_utility.py --real shards/real --synthetic synth/proposed \
        --out utility [--target-per-class N] [--split test] [classifier flags ...]

Takes every flag of jobs/train_classifier.py (preset, architecture, epochs, workers, ...) for
the shared classifier setup; --out receives one folder per arm and utility.json (per-class
AUROC of both arms, the difference, the rare classes).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.runtime import run_job  # noqa: E402
from cxrfactory.classifier.utility import evaluate_utility, format_table  # noqa: E402
from jobs.train_classifier import build_parser, resolve_config  # noqa: E402


def main(argv=None) -> int:
    parser = build_parser()
    parser.description = __doc__
    parser.add_argument("--target-per-class", type=int, default=None, metavar="N",
                        help="rows per class per epoch in the mixed arm (default: the largest "
                             "real class's train count)")
    parser.add_argument("--split", default="test", help="real split both arms are scored on")
    args = parser.parse_args(argv)
    if not args.synthetic:
        parser.error("--synthetic URI is required: the synthetic set to evaluate")
    if args.target_per_class is not None and args.target_per_class < 1:
        parser.error(f"--target-per-class must be >= 1, got {args.target_per_class}")
    config = resolve_config(args, parser)
    target = args.target_per_class or _largest_class(config)
    result = evaluate_utility(config, config.synthetic, target, args.out, split=args.split)
    print(format_table(result))
    print(f"[utility] {Path(args.out).absolute() / 'utility.json'}")
    return 0


def _largest_class(config) -> int:
    from cxrfactory import shards
    from cxrfactory.storage import resolve

    manifest = shards.read_manifest(resolve(config.real, config.s3_endpoint))
    return max(manifest.class_counts("train").values())


if __name__ == "__main__":
    run_job(main)

"""Downstream utility of synthetic data: the same classifier trained on real only and on real +
synthetic balanced to a target per class, both scored on the real test split.

    python jobs/evaluate_utility.py --real shards/real --synthetic synth/proposed \
        --out utility [--target-per-class N] [--split test] [classifier flags ...]
        [--preset full|demo|smoke | --config FILE] [--set classifier.lr=3e-4 ...]

Takes every flag of jobs/train_classifier.py (preset, architecture, epochs, workers, ...) for
the shared classifier setup; --out receives one folder per arm and utility.json (per-class
AUROC of both arms, the difference, the rare classes). The config (a UtilityConfig: a
``classifier`` section, ``target_per_class``, ``split``) is resolved in one order: the preset
(cxrfactory/configs/utility/, default full) or --config FILE, then the flags, then --set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.classifier.utility_config import KIND, UtilityConfig  # noqa: E402
from cxrfactory.config import add_config_arguments, config_from_args  # noqa: E402
from cxrfactory.errors import UserError  # noqa: E402
from cxrfactory import filenames  # noqa: E402
from cxrfactory.runtime import run_job  # noqa: E402
from cxrfactory.storage import resolve  # noqa: E402
from jobs.train_classifier import DEFAULT_PRESET, add_classifier_arguments, classifier_flags  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="real shard folder or s3:// URI (train, val and test splits)")
    p.add_argument("--out", required=True, help="folder or s3:// URI: one folder per arm and utility.json")
    add_config_arguments(p, KIND, default=DEFAULT_PRESET)
    add_classifier_arguments(p)
    p.add_argument("--smoke", action="store_true", help="the smoke preset: a tiny network for 2 steps")
    p.add_argument("--target-per-class", type=int, default=None, metavar="N",
                   help="rows per class per epoch in the mixed arm (default: the largest "
                        "real class's train count)")
    p.add_argument("--split", default=None, help="real split both arms are scored on (default test)")
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> UtilityConfig:
    """Preset (or --smoke) or file, then the flags, then --set; a bad value is a usage error."""
    if args.target_per_class is not None and args.target_per_class < 1:
        parser.error(f"--target-per-class must be >= 1, got {args.target_per_class}")
    flags = {f"classifier.{name}": value for name, value in classifier_flags(args, parser).items()}
    flags.update({"target_per_class": args.target_per_class, "split": args.split})
    try:
        config = config_from_args(parser, args, UtilityConfig, kind=KIND,
                                  default="smoke" if args.smoke else DEFAULT_PRESET, flags=flags)
    except UserError as error:  # a value the classifier config refuses
        parser.error(str(error))
        raise  # unreachable: parser.error exits
    if not config.classifier.synthetic:
        parser.error("--synthetic URI is required: the synthetic set to evaluate")
    return config


def main(argv=None) -> int:
    # Imported here: the parser (and its tests) need no Ray.
    from cxrfactory.classifier.utility import evaluate_utility, format_table

    parser = build_parser()
    args = parser.parse_args(argv)
    config = resolve_config(args, parser)
    classifier = config.classifier
    target = config.target_per_class or _largest_class(classifier)
    result = evaluate_utility(classifier, classifier.synthetic, target, classifier.out, split=config.split)
    print(format_table(result))
    print(f"[utility] {resolve(classifier.out, classifier.s3_endpoint).join(filenames.UTILITY).uri}")
    return 0


def _largest_class(config) -> int:
    from cxrfactory import shards
    from cxrfactory.storage import resolve

    manifest = shards.read_manifest(resolve(config.real, config.s3_endpoint))
    return max(manifest.class_counts("train").values())


if __name__ == "__main__":
    run_job(main)

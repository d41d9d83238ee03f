"""Train the DenseNet classifier (FDD's feature extractor) on real shards with Ray Train.

    python jobs/train_classifier.py --real shards/real --out classifiers/densenet
        [--preset full|demo|smoke | --config FILE] [--arch densenet121|small|tiny] [--resolution PX]
        [--classes CLASS ...] [--mode multiclass|multilabel] [--class-weighted]
        [--synthetic URI ...] [--synthetic-ratio R | --balance-per-class N]
        [--epochs E] [--batch-size B] [--lr LR] [--max-steps-per-epoch S] [--no-augment]
        [--weights FILE] [--num-workers N] [--use-gpu | --no-use-gpu] [--cpus-per-worker C]
        [--torch-threads T] [--seed S] [--storage DIR|s3://...] [--run-name NAME]
        [--s3-endpoint URL] [--set field=value ...] [--smoke]

Every epoch is validated on the real val split (per-class AUROC, accuracy, confusion matrix);
Ray Train keeps the checkpoint with the best macro AUROC, which is exported with its
preprocessing as <out>/classifier (pass it to jobs/fdd.py --classifier). <out>/metrics.jsonl
holds every epoch. The config is resolved in one order: the preset (cxrfactory/configs/classifier/,
default full: DenseNet-121 at 256 px) or --config FILE, then the flags, then --set (any
ClassifierConfig field, e.g. --set lr=3e-4); running the same command again resumes the run. --synthetic-ratio R makes synthetic rows a fraction R
of each epoch; --balance-per-class N takes at most N real rows per class and fills every
class up to N with synthetic ones (without --synthetic it only caps the real rows); with
neither, all synthetic rows are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.classifier.config import (  # noqa: E402
    KIND,
    MODES,
    NETWORK_SIZES,
    ClassifierConfig,
    ClassifierTrainingError,
)
from cxrfactory.classifier.driver import train_classifier  # noqa: E402
from cxrfactory.config import add_config_arguments, config_from_args  # noqa: E402
from cxrfactory.errors import UserError  # noqa: E402
from cxrfactory.runtime import run_job  # noqa: E402

#: The preset a run starts from without --preset, --config or --smoke.
DEFAULT_PRESET = "full"
#: Flags that map one to one onto ClassifierConfig fields (argparse dest = field name).
FIELDS = ("arch", "resolution", "mode", "class_weighted", "synthetic_ratio", "balance_per_class",
          "epochs", "batch_size", "lr", "max_steps_per_epoch", "augment", "weights", "num_workers",
          "use_gpu", "cpus_per_worker", "torch_threads", "seed", "storage", "run_name", "s3_endpoint")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, help="real shard folder or s3:// URI (train and val splits)")
    p.add_argument("--out", required=True, help="folder or s3:// URI for classifier/ and metrics.jsonl")
    add_config_arguments(p, KIND, default=DEFAULT_PRESET)
    add_classifier_arguments(p)
    p.add_argument("--smoke", action="store_true", help="the smoke preset: a tiny network for 2 steps")
    return p


def add_classifier_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that set ClassifierConfig fields (shared with jobs/evaluate_utility.py)."""
    p.add_argument("--arch", choices=sorted(NETWORK_SIZES), default=None, help="network size")
    p.add_argument("--resolution", type=int, default=None, metavar="PX", help="preprocessing side in px")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="classes to learn (default: every class of the real shards)")
    p.add_argument("--mode", choices=MODES, default=None, help="one label per image or findings")
    p.add_argument("--class-weighted", action=argparse.BooleanOptionalAction, default=None,
                   help="inverse-frequency class weights in the loss")
    p.add_argument("--synthetic", nargs="+", default=None, metavar="URI", help="synthetic shard roots to mix in")
    mix = p.add_mutually_exclusive_group()
    mix.add_argument("--synthetic-ratio", type=float, default=None, metavar="R",
                     help="synthetic fraction of each epoch's rows, in [0, 1)")
    mix.add_argument("--balance-per-class", type=int, default=None, metavar="N",
                     help="rows per class per epoch: real first (at most N), synthetic fill the gap")
    p.add_argument("--epochs", type=int, default=None, help="passes over the training mix")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (all workers together)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, metavar="S", help="cut epochs short")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="light random affine + brightness/contrast (default on)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="initial state dict (ours or torchvision's ImageNet densenet121 file)")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (data-parallel)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="Ray CPUs per worker (default: auto)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per worker (default: Ray's)")
    p.add_argument("--seed", type=int, default=None, help="seeds weights, augmentation and draws")
    p.add_argument("--storage", default=None, help="Ray Train storage, folder or s3:// (default <out>/runs)")
    p.add_argument("--run-name", default=None, help="run folder in the storage; the same name resumes")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (else CXRF_S3_ENDPOINT / AWS)")


def classifier_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The ClassifierConfig fields the flags give (None: not given); a bad count is a usage error."""
    if args.smoke and args.preset not in (None, "smoke"):
        parser.error("--smoke is the smoke preset; drop --preset")
    if args.smoke and args.config:
        parser.error("--smoke is the smoke preset; drop --config")
    for flag in ("resolution", "epochs", "batch_size", "max_steps_per_epoch", "num_workers",
                 "torch_threads", "balance_per_class"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    fields = {name: getattr(args, name) for name in FIELDS}
    return {"real": args.real, "out": args.out, "synthetic": args.synthetic, "classes": args.classes,
            **fields}


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ClassifierConfig:
    """Preset (or --smoke) or file, then every flag given, then --set; a bad value is a usage error."""
    flags = classifier_flags(args, parser)
    try:
        return config_from_args(parser, args, ClassifierConfig, kind=KIND,
                                default="smoke" if args.smoke else DEFAULT_PRESET, flags=flags)
    except UserError as error:  # a value the config refuses (a ratio out of range, a class, ...)
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def main(argv=None) -> int:
    parser = build_parser()
    config = resolve_config(parser.parse_args(argv), parser)
    print("[classifier] config: " + json.dumps(
        {k: v for k, v in dataclasses.asdict(config).items() if v not in (None, ())}))
    try:
        result = train_classifier(config)
    except ClassifierTrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"[classifier] artifact: {result.artifact} (sha256 {result.sha256})")
    print(f"[classifier] best epoch {result.epoch}: val macro AUROC "
          f"{result.metrics.get('val_macro_auroc')}, accuracy {result.metrics.get('val_accuracy')}")
    return 0


if __name__ == "__main__":
    run_job(main)

"""Mass-produce class-balanced synthetic X-rays as Parquet shards (Ray Data).

    python jobs/synthesize.py --generator PATH --target-per-class 20000 --out s3://bucket/cxr-synth
        [--classes Normal Effusion ...] [--balance-against REAL_URI [--split train]] [--seed S]
        [--batch-size B] [--rows-per-file R] [--resolution PX] [--workers W]
        [--gpus-per-worker G] [--cpus-per-worker C] [--exclude-flagged AUDIT_DIR ...]
        [--s3-endpoint URL] [--overwrite] [--config FILE] [--set field=value ...]

Every selected class ends with exactly N synthetic rows; with --balance-against, N minus its
real count in that split (never below 0), so real + synthetic = N per class. Run the same
command again after a stop: only the missing files are made. --config FILE (YAML/JSON) gives any
SynthesisConfig field; the flags override it and --set field=value overrides both.

A clean set: --exclude-flagged AUDIT_DIR (repeatable; the --out of jobs/audit.py on a set of
this generator and --seed) leaves out every image the audit flagged, and every image the
audited set had itself excluded, and makes replacements from further seeds: still exactly N
rows per class, each regenerable from its seed; the manifest records the audits (rule,
thresholds) and how many images per class were replaced. Write it to a new --out, then audit
it again to check the replacements.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.config import add_config_arguments, config_from_args  # noqa: E402
from cxrfactory.runtime import command_line, init_ray, run_job  # noqa: E402
from cxrfactory.synthesis import SynthesisConfig, prepare_synthesis, run_synthesis  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    # Flags without a given value stay None, so a --config file's value is not overridden by a
    # flag's default; the defaults named in the help are SynthesisConfig's.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="generator artifact folder (path or s3:// URI)")
    p.add_argument("--target-per-class", type=int, required=True, metavar="N",
                   help="rows per class at the end")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help="classes to make (default: every class the generator was trained on)")
    p.add_argument("--balance-against", default=None, metavar="REAL_URI",
                   help="real shard folder: make N minus its count per class")
    p.add_argument("--split", default=None, help="split of --balance-against to count (default train)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 64)")
    p.add_argument("--rows-per-file", type=int, default=None, help="rows per shard (default 1000)")
    p.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="output side in px (default: the generator's)")
    p.add_argument("--workers", type=int, default=None, help="generator actors (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per actor when the cluster has GPUs (default 0: CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                   help="CPUs per actor, its torch and PNG threads (default: the cluster's CPUs "
                        "shared by the workers; at most 8 for GPU workers)")
    p.add_argument("--exclude-flagged", action="append", default=None, metavar="AUDIT_DIR",
                   help="memorization audit folder (jobs/audit.py --out) of a set of this generator "
                        "and seed: leave out its flagged images and make replacements from further "
                        "seeds (repeatable)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace what the output holds")
    add_config_arguments(p)
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser,
                   command: str | None = None) -> SynthesisConfig:
    """--config FILE, then the flags given, then --set."""
    if args.target_per_class <= 0:
        parser.error(f"--target-per-class must be positive, got {args.target_per_class}")
    if args.split is not None and args.balance_against is None:
        parser.error("--split only applies with --balance-against")
    names = ("generator", "out", "target_per_class", "classes", "balance_against", "split", "seed",
             "batch_size", "rows_per_file", "resolution", "workers", "gpus_per_worker",
             "cpus_per_worker", "exclude_flagged", "s3_endpoint", "overwrite")
    flags = {name: getattr(args, name) for name in names}
    return config_from_args(parser, args, SynthesisConfig, flags={**flags, "command": command})


def main(argv=None) -> int:
    parser = build_parser()
    config = resolve_config(parser.parse_args(argv), parser, command_line(__file__, argv))
    run = prepare_synthesis(config)  # every check on the input, before Ray starts
    if run.todo:
        init_ray()
    run_synthesis(run)
    return 0


if __name__ == "__main__":
    run_job(main)

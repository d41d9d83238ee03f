"""The results report: loss curves, FDD, per-image metrics, the memorization audit, samples,
class balance and downstream utility in one page.

    python jobs/report.py --out DIR [--run RUN_DIR] [--baseline-run RUN_DIR] [--real URI]
        [--synthetic NAME=URI ...] [--balanced NAME=URI ...] [--fdd DIR] [--utility FILE]
        [--audit DIR] [--title T] [--samples-per-class K] [--sample-split SPLIT] [--strict]
        [--s3-endpoint URL]
        [--config FILE] [--set KEY=VALUE ...]

Writes <out>/report.html (self-contained: figures inline, no external resources), <out>/report.md
and the figures it references in <out>/figures/, then prints a short summary. Every input is
optional, but at least one is needed; a section whose input is absent says so and names the flag
that supplies it. --run is the proposed model's training run folder (<storage>/<run-name>),
--baseline-run the cDCGAN's; --synthetic NAME=URI is repeatable and its order is Table 2's
column order (e.g. --synthetic cDCGAN=... --synthetic proposed=...). --balanced NAME=URI names
the sets made to balance the real training split (jobs/synthesize.py --balance-against) for the
class-balance section when they differ from the --synthetic ones (default: the --synthetic sets
that were made with --balance-against). --fdd's fdd.json also feeds the per-class fidelity,
diversity and privacy section when jobs/fdd.py measured them (--metrics ... kid prdc
memorization). --audit DIR is the --out folder of jobs/audit.py (audit.json, closest.png): the
memorization audit section. A given input that does not exist is reported as missing (with
--strict: an error); one of the wrong kind is an error.
Needs no Ray.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.report.report import (  # noqa: E402
    DEFAULT_TITLE,
    MAX_PER_CLASS,
    ReportConfig,
    write_report,
)
from cxrfactory.report.inputs import ReportInputError  # noqa: E402
from cxrfactory.config import add_config_arguments, config_from_args  # noqa: E402
from cxrfactory.runtime import named_uris_or_exit, run_job  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    # Flags without a given value stay None, so a --config file's value is not overridden by a
    # flag's default; the defaults named in the help are ReportConfig's.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder or s3:// URI")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="the proposed model's training run folder")
    p.add_argument("--baseline-run", default=None, metavar="RUN_DIR", help="the cDCGAN baseline's run folder")
    p.add_argument("--real", default=None, metavar="URI", help="real shard folder or s3:// URI")
    p.add_argument("--synthetic", action="append", default=[], metavar="NAME=URI",
                   help="a synthetic shard set and its column name (repeatable, in column order)")
    p.add_argument("--balanced", action="append", default=[], metavar="NAME=URI",
                   help="a synthetic set made to balance the real data, for the class-balance section "
                        "(repeatable; default: the --synthetic sets made with --balance-against)")
    p.add_argument("--fdd", default=None, metavar="DIR", help="jobs/fdd.py output folder (or its fdd.json)")
    p.add_argument("--utility", default=None, metavar="FILE", help="the downstream experiment's utility.json")
    p.add_argument("--audit", default=None, metavar="DIR",
                   help="memorization audit folder (jobs/audit.py --out): audit.json, closest.png")
    p.add_argument("--title", default=None, help=f"the report's heading (default {DEFAULT_TITLE!r})")
    p.add_argument("--samples-per-class", type=int, default=None, metavar="K",
                   help=f"Table 2: images per class and source (1..{MAX_PER_CLASS}, default 4)")
    p.add_argument("--sample-split", default=None, help="Table 2: the real split shown (default test)")
    p.add_argument("--strict", action="store_true", default=None,
                   help="a given input that does not exist is an error")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL (else CXRF_S3_ENDPOINT / AWS)")
    add_config_arguments(p)
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ReportConfig:
    """--config FILE, then the flags given, then --set; a bad value is a usage error."""
    if args.samples_per_class is not None and not 1 <= args.samples_per_class <= MAX_PER_CLASS:
        parser.error(f"--samples-per-class must be 1..{MAX_PER_CLASS}, got {args.samples_per_class}")
    flags = {name: getattr(args, name) for name in (
        "out", "run", "baseline_run", "real", "fdd", "utility", "audit", "title", "samples_per_class",
        "sample_split", "strict", "s3_endpoint")}
    # A NAME=URI list given on the command line replaces the file's; none given keeps it.
    flags["synthetic"] = named_uris_or_exit(parser, args.synthetic) or None
    flags["balanced"] = named_uris_or_exit(parser, args.balanced, "--balanced") or None
    try:
        return config_from_args(parser, args, ReportConfig, flags=flags)
    except ReportInputError as error:  # e.g. no input at all: a usage error, as before
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def main(argv=None) -> int:
    parser = build_parser()
    config = resolve_config(parser.parse_args(argv), parser)
    result = write_report(config)
    print("\n".join(result.summary))
    return 0


if __name__ == "__main__":
    run_job(main)

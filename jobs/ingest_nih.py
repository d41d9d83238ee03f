"""Ingest NIH ChestX-ray14 (or a phantom folder in its layout) into Parquet shards.

    python jobs/ingest_nih.py --nih-root data/nih --out shards/real [--resolution 256]
        [--classes Normal Effusion ...] [--include-multilabel] [--rows-per-file 1000]
        [--s3-endpoint URL] [--overwrite] [--config FILE] [--set field=value ...]

--config FILE (YAML/JSON) gives any IngestConfig field (val_fraction, test_fraction too); the
flags override it and --set field=value overrides both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.config import add_config_arguments, config_from_args  # noqa: E402
from cxrfactory.data.nih import IngestConfig, prepare_ingest, run_ingest  # noqa: E402
from cxrfactory.labels import DEFAULT_CLASSES  # noqa: E402
from cxrfactory.runtime import command_line, init_ray, run_job  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    # Flags without a given value stay None, so a --config file's value is not overridden by a
    # flag's default; the defaults named in the help are IngestConfig's.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nih-root", required=True, help="folder with Data_Entry_2017*.csv and images/")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--resolution", type=int, default=None, help="output side in px (default 256)")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help=f"classes to keep (default all: {' '.join(DEFAULT_CLASSES)})")
    p.add_argument("--include-multilabel", action="store_true", default=None,
                   help="keep images with several findings (label = first selected class)")
    p.add_argument("--rows-per-file", type=int, default=None, help="rows per shard (default 1000)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace what the output holds")
    add_config_arguments(p)
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser,
                   command: str | None = None) -> IngestConfig:
    """--config FILE, then the flags given, then --set."""
    names = ("nih_root", "out", "resolution", "classes", "include_multilabel", "rows_per_file",
             "s3_endpoint", "overwrite")
    flags = {name: getattr(args, name) for name in names}
    return config_from_args(parser, args, IngestConfig, flags={**flags, "command": command})


def main(argv=None) -> int:
    parser = build_parser()
    config = resolve_config(parser.parse_args(argv), parser, command_line(__file__, argv))
    run = prepare_ingest(config)  # the CSV, the images and the output: checked before Ray starts
    if run.todo and run.complete is None:
        init_ray()
    run_ingest(run)
    return 0


if __name__ == "__main__":
    run_job(main)

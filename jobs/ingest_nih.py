"""Ingest NIH ChestX-ray14 (or a phantom folder in its layout) into Parquet shards.

    python jobs/ingest_nih.py --nih-root data/nih --out shards/real [--resolution 256]
        [--classes Normal Effusion ...] [--include-multilabel] [--rows-per-file 1000]
        [--s3-endpoint URL] [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.data.nih import IngestConfig, check_source, ingest  # noqa: E402
from cxrfactory.labels import DEFAULT_CLASSES  # noqa: E402
from cxrfactory.runtime import command_line, init_ray, run_job  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nih-root", required=True, help="folder with Data_Entry_2017*.csv and images/")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--resolution", type=int, default=256, help="output side in px (default 256)")
    p.add_argument("--classes", nargs="+", default=None, metavar="CLASS",
                   help=f"classes to keep (default all: {' '.join(DEFAULT_CLASSES)})")
    p.add_argument("--include-multilabel", action="store_true",
                   help="keep images with several findings (label = first selected class)")
    p.add_argument("--rows-per-file", type=int, default=1000, help="rows per shard (default 1000)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    p.add_argument("--overwrite", action="store_true", help="replace what the output holds")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = IngestConfig(
        nih_root=args.nih_root, out=args.out, resolution=args.resolution,
        classes=tuple(args.classes) if args.classes else DEFAULT_CLASSES,
        include_multilabel=args.include_multilabel, rows_per_file=args.rows_per_file,
        s3_endpoint=args.s3_endpoint, overwrite=args.overwrite,
        command=command_line(__file__, argv),
    )
    check_source(config.nih_root)
    init_ray()
    ingest(config)
    return 0


if __name__ == "__main__":
    run_job(main)

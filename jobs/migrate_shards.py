"""Migrate shard folders written by cxrfactory 0.1 (``manifest.json``, ``label=<Class>/``
folders: shard format 1) in place to the current format, which every data tool opens.

    python jobs/migrate_shards.py ROOT [ROOT ...] [--s3-endpoint URL]

Safe to stop and run again; nothing is deleted before the migrated folder is verified. A
folder already in the current format is left as it is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfactory.errors import UserError  # noqa: E402
from cxrfactory.runtime import one_line, run_job  # noqa: E402
from cxrfactory.shard_migration import migrate  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", metavar="ROOT", help="shard folder: path or s3://bucket/prefix")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if len(args.roots) == 1:
        migrate(args.roots[0], s3_endpoint=args.s3_endpoint)
        return 0
    failed = []  # one folder's problem does not stop the others
    for root in args.roots:
        try:
            migrate(root, s3_endpoint=args.s3_endpoint)
        except UserError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            failed.append(root)
    if failed:
        print(f"error: {len(failed)} of {len(args.roots)} folder(s) not migrated: {', '.join(failed)}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    run_job(main)

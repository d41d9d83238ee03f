"""Migrate a shard folder of format 1 (``label=<Class>/`` folders, ``manifest.json``) in place.

Format 1 could not be opened by pandas or pyarrow (see :mod:`cxrfactory.shards`). Migration
rewrites each file ``label=<Class>/part-k.parquet`` as one file per split it holds,
``<split>/<Class>/part-k.parquet`` (the rows and their bytes unchanged, in their order; the
footer's list of skipped inputs kept), then writes the card and ``_manifest.json``, and only
then deletes the old files and, last, ``manifest.json``.

Nothing is lost at any point: until ``_manifest.json`` is written the old folder is whole; after
it, the new one is verified before anything old is deleted. A stopped migration is completed by
running it again.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pyarrow.compute as pc

from cxrfactory.dataset_card import finish_set
from cxrfactory import filenames
from cxrfactory import shards
from cxrfactory.storage import Location, check_readable, check_writable, resolve


def migrate(uri: str, *, s3_endpoint: str | None = None,
            log: Callable[[str], None] = print) -> shards.Manifest:
    """Bring the shard folder at ``uri`` to the current format; returns its new manifest."""
    root = resolve(uri, s3_endpoint)
    check_readable(root, "shard folder")
    legacy_loc = root.join(filenames.LEGACY_MANIFEST)
    current_loc = root.join(filenames.MANIFEST)
    if not legacy_loc.exists():
        if not current_loc.exists() and any(p.startswith("label=") for p in root.list_files(".parquet")):
            raise shards.ManifestError(
                f"{root.uri} holds shards of an unfinished run of format 1 and no manifest: "
                "finish the run with the cxrfactory that started it, then migrate; nothing was changed")
        manifest = shards.read_manifest(root)  # a clear error when it is no shard folder at all
        log(f"[migrate] {root.uri} is already in shard format {manifest.format}; nothing to do")
        return manifest
    check_writable(root)
    try:
        legacy = shards.Manifest.from_json(legacy_loc.read_text())
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise shards.ManifestError(f"{legacy_loc.uri} is not a valid manifest: {exc}; "
                                   "nothing was changed") from exc
    if current_loc.exists():  # a previous migration stopped while deleting the old files
        manifest = shards.read_manifest(root)
    else:
        # Every old file present, named and counted as the manifest says, before any write.
        shards.read_manifest(root, note=False)
        _check_files(root, legacy)
        manifest = _rewrite(root, legacy, log)
        finish_set(root, manifest)
        shards.read_manifest(root)  # verified before anything old goes
    kept = set(manifest.files)
    old = [f for f in legacy.files if f not in kept]
    for rel in old:
        loc = root.join(rel)
        if loc.exists():
            loc.fs.delete_file(loc.path)
    if not root.is_s3:  # S3 has no folders; locally the emptied label=<Class>/ folders go too
        for folder in sorted({rel.rsplit("/", 1)[0] for rel in old}):
            loc = root.join(folder)
            if loc.exists() and not loc.list_files():
                loc.fs.delete_dir(loc.path)
    legacy_loc.fs.delete_file(legacy_loc.path)
    log(f"[migrate] {root.uri}: {len(legacy.files)} file(s) of format {legacy.format} -> "
        f"{len(manifest.files)} of format {manifest.format}, {manifest.total()} rows")
    return manifest


def _rewrite(root: Location, legacy: shards.Manifest, log: Callable[[str], None]) -> shards.Manifest:
    """Write the new files; the new manifest keeps every field but the file list and format."""
    files = []
    for rel in legacy.files:
        label, index = shards.shard_class(rel), _index(rel)
        table = shards.read_shard(root.join(rel))
        _, skipped = shards.shard_footer(root.join(rel))
        splits = table.column("split").unique().to_pylist()
        for k, split in enumerate(sorted(splits)):
            part = table.filter(pc.equal(table.column("split"), split))
            new = shards.shard_path(split, label, index)
            # The skipped inputs stay in a footer (the first piece's), as a resumed ingest
            # rebuilds the manifest's list from the footers.
            shards.write_shard(root.join(new), part.cast(shards.SCHEMA), skipped if k == 0 else None)
            files.append(new)
        if not splits and skipped:  # every input of this file was skipped: keep the record
            files.append(shards.shard_path(_only_split(legacy), label, index))
            shards.write_shard(root.join(files[-1]), shards.make_table([]), skipped)
    log(f"[migrate] {root.uri}: rewrote {len(legacy.files)} file(s) as {len(files)}")
    extra = {**legacy.extra, "migrated_from_format": legacy.format}
    return dataclasses.replace(legacy, files=files, format=shards.FORMAT_VERSION, extra=extra)


def _check_files(root: Location, legacy: shards.Manifest) -> None:
    """Names of the format-1 layout, and as many rows in the footers as the manifest counts."""
    bad = [f for f in legacy.files if not LEGACY_FILE.fullmatch(f)]
    if bad:
        raise shards.ManifestError(f"{root.uri}: {bad[0]} is not a file of shard format 1 "
                                   "(label=<Class>/part-NNNNN.parquet); nothing was changed")
    rows = sum(shards.shard_footer(root.join(f))[0] for f in legacy.files)
    if rows != legacy.total():
        raise shards.ManifestError(f"{root.uri}: the files hold {rows} rows where "
                                   f"{filenames.LEGACY_MANIFEST} counts {legacy.total()}; "
                                   "not a complete set, nothing was changed")


LEGACY_FILE = re.compile(r"label=[^/]+/part-\d+\.parquet")


def _index(rel: str) -> int:
    """``label=Mass/part-00003.parquet`` -> 3."""
    return int(rel.rsplit("/", 1)[-1].removeprefix("part-").removesuffix(".parquet"))


def _only_split(manifest: shards.Manifest) -> str:
    """Where an empty file goes: the set's one split, else ``train``."""
    return next(iter(manifest.counts)) if len(manifest.counts) == 1 else "train"

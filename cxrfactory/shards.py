"""The product's format: Parquet shards in one folder per split and class, plus sidecars.

Layout (format 2; README "The data format")::

    <root>/train/Mass/part-00000.parquet   # <folder>/<Class>/part-NNNNN.parquet
    <root>/val/Mass/part-00000.parquet     # folders train, val, test; synthetic rows in train/
    <root>/_README.md                      # dataset card (YAML header for the Hub)
    <root>/_plan.json                      # written first by a resumable writer
    <root>/_manifest.json                  # written last; lists every shard file

Why this shape: every data tool opens ``<root>`` with its defaults. Sidecars start with ``_``,
which pandas, pyarrow and Ray Data skip, and are no ``*.parquet`` for Polars' and DuckDB's
globs; the folders carry no ``key=value`` names, so no hive reader adds a partition column that
clashes with the stored ``label`` (format 1 had ``label=<Class>/`` folders and ``label`` in
the files: pandas inferred a dictionary partition and refused to merge it with the string
column). ``label`` and ``split`` live in the files, so a reader without hive support (Hugging
Face ``datasets``, a single file) still has them. Folders are named after the split a reader
uses the rows for (:data:`SPLIT_FOLDERS`): Hugging Face ``datasets`` infers its splits
``train``, ``validation``, ``test`` from them and reads only what is below them; a folder
without such a name would make it read every file of the root, sidecars included, as data.

The ``image`` column is a struct ``{bytes, path}`` holding grayscale PNG bytes
(:mod:`cxrfactory.images` encodes and decodes them): the layout of a
Hugging Face ``datasets.Image`` feature, and the files say so in their schema metadata, so
``datasets`` decodes it to a PIL image without a cast.

A reader trusts a manifest only when every file it lists is present (:func:`read_manifest`).
This module imports no Ray; the Ray Data readers live in :mod:`cxrfactory.raydata`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cxrfactory.errors import UserError
from cxrfactory import filenames
from cxrfactory.storage import Location, StorageError

FORMAT_VERSION = 2  # 1: label=<Class>/ folders and manifest.json (migrate with jobs/migrate_shards.py)
READABLE_FORMATS = (1, 2)
SPLITS = ("train", "val", "test")
SYNTHETIC_SPLIT = "synthetic"
SOURCES = ("nih", "phantom", "synthetic")
MIGRATE_COMMAND = "python jobs/migrate_shards.py"
#: The folder a split's files live in. Synthetic rows are training data to whoever reads them;
#: their ``split`` column still says ``synthetic``.
SPLIT_FOLDERS = {"train": "train", "val": "val", "test": "test", SYNTHETIC_SPLIT: "train"}

log = logging.getLogger(__name__)

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

#: Hugging Face ``datasets`` features, carried in every file's schema metadata (the key and
#: layout ``datasets`` itself writes): ``image`` decodes to a PIL image with no cast. Columns
#: left out (``findings``) are inferred from their Arrow type by every ``datasets`` version.
HF_FEATURES = {
    "image_id": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "label": {"dtype": "string", "_type": "Value"},
    "split": {"dtype": "string", "_type": "Value"},
    "patient_id": {"dtype": "int64", "_type": "Value"},
    "source": {"dtype": "string", "_type": "Value"},
    "seed": {"dtype": "int64", "_type": "Value"},
    "generator": {"dtype": "string", "_type": "Value"},
    "height": {"dtype": "int32", "_type": "Value"},
    "width": {"dtype": "int32", "_type": "Value"},
}
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": HF_FEATURES}}).encode()}

SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", IMAGE_TYPE),
        ("label", pa.string()),
        ("findings", pa.list_(pa.string())),
        ("split", pa.string()),
        ("patient_id", pa.int64()),
        ("source", pa.string()),
        ("seed", pa.int64()),
        ("generator", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ],
    metadata=HF_METADATA,
)

# Parquet footer key under which a writer records what the shard left out (skipped inputs).
SKIPPED_METADATA_KEY = b"cxrfactory.skipped"


class ManifestError(UserError, ValueError):
    """A manifest that is missing, malformed or lists shards that are not there."""


# ---------------------------------------------------------------------------------------------
# Tables


def make_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows of :data:`SCHEMA` (``image`` as ``{"bytes", "path"}``) -> a table with SCHEMA."""
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def table_to_parquet_bytes(table: pa.Table, skipped: list[dict] | None = None) -> bytes:
    """Serialise a shard; ``skipped`` inputs are kept in the footer so a resumed job can
    rebuild the manifest's ``skipped`` list without redoing the work."""
    meta = {**(table.schema.metadata or {}), **HF_METADATA}
    if skipped:
        meta[SKIPPED_METADATA_KEY] = json.dumps(skipped).encode()
    table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    # Images are already PNG-compressed; Parquet compression would only cost time.
    pq.write_table(table, sink, compression="none", use_dictionary=["label", "split", "source",
                                                                     "generator"])
    return sink.getvalue().to_pybytes()


def write_shard(loc: Location, table: pa.Table, skipped: list[dict] | None = None) -> None:
    """Write one shard atomically (whole or absent)."""
    if not table.schema.equals(SCHEMA, check_metadata=False):
        raise ValueError(f"shard schema differs from the contract:\n{table.schema}")
    loc.write_bytes(table_to_parquet_bytes(table, skipped))


def read_shard(loc: Location, columns: list[str] | None = None) -> pa.Table:
    with loc.fs.open_input_file(loc.path) as f:
        return pq.read_table(f, columns=columns)


def shard_footer(loc: Location) -> tuple[int, list[dict]]:
    """(number of rows, skipped list) of a shard, from its footer only."""
    with loc.fs.open_input_file(loc.path) as f:
        meta = pq.read_metadata(f)
    raw = (meta.metadata or {}).get(SKIPPED_METADATA_KEY)
    return meta.num_rows, (json.loads(raw) if raw else [])


def shard_path(split: str, label: str, index: int) -> str:
    """Relative path of a class's ``index``-th shard in a split: ``train/Mass/part-00003.parquet``."""
    return f"{SPLIT_FOLDERS.get(split, split)}/{label}/part-{index:05d}.parquet"


def shard_class(path: str) -> str:
    """The class a shard holds, from its relative path (either format's layout)."""
    parts = path.split("/")
    if parts[0].startswith("label="):  # format 1: label=<Class>/part-k.parquet
        return parts[0].removeprefix("label=")
    return parts[-2]


def shard_folder(path: str) -> str | None:
    """The split folder of a shard (:data:`SPLIT_FOLDERS`); None for format 1, whose files
    mix splits."""
    return None if path.startswith("label=") else path.split("/", 1)[0]


def select_files(manifest: "Manifest", classes: Collection[str] | None = None,
                 split: str | None = None) -> list[str]:
    """The listed shards that may hold rows of ``classes`` in ``split`` (None: any), by path.

    A folder may hold rows of another split (a synthetic set's ``train/``), and a format-1 file
    mixes splits: filter the rows on ``split`` too.
    """
    return [f for f in manifest.files
            if (classes is None or shard_class(f) in classes)
            and (split is None or shard_folder(f) in (None, SPLIT_FOLDERS.get(split, split)))]


def is_hidden(path: str) -> bool:
    """True for what the data tools skip: a name or folder starting with ``_`` or ``.``."""
    return any(part.startswith(("_", ".")) for part in path.split("/"))


def list_shards(root: Location) -> list[str]:
    """Relative paths of every Parquet shard below ``root`` (what the plain readers see)."""
    return [p for p in root.list_files(".parquet") if not is_hidden(p) and "/" in p]


# ---------------------------------------------------------------------------------------------
# Manifest


@dataclass
class Manifest:
    """``_manifest.json``: what a shard folder holds. Written last by every writer."""

    source: str  # nih | phantom | synthetic
    classes: list[str]  # the class vocabulary of the rows, in order
    counts: dict[str, dict[str, int]]  # split -> class -> rows
    files: list[str]  # shard paths relative to the root
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    config: dict[str, Any] = field(default_factory=dict)  # the resolved job config
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # synthetic: generator, seed, plan, ...

    def to_json(self) -> str:
        data = asdict(self)
        extra = data.pop("extra")
        return json.dumps({**data, **extra}, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        missing = {"source", "classes", "counts", "files"} - set(data)
        if missing:
            raise ManifestError(f"manifest lacks {sorted(missing)}")
        counts = data["counts"]
        if not (isinstance(counts, dict) and all(
                isinstance(per, dict) and all(isinstance(n, int) and n >= 0 for n in per.values())
                for per in counts.values())):
            raise ManifestError("manifest counts must map split -> class -> a count of rows")
        if not (isinstance(data["files"], list) and all(isinstance(f, str) for f in data["files"])):
            raise ManifestError("manifest files must be a list of relative paths")
        if data.get("format") not in READABLE_FORMATS:
            raise ManifestError(f"manifest format {data.get('format')!r} is not one of "
                                f"{READABLE_FORMATS}; this cxrfactory is older than the folder")
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)

    def total(self, split: str | None = None) -> int:
        splits = [split] if split else list(self.counts)
        return sum(sum(self.counts.get(s, {}).values()) for s in splits)

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        """Rows per class, in vocabulary order, for one split or all."""
        out = {c: 0 for c in self.classes}
        for s, per_class in self.counts.items():
            if split is None or s == split:
                for c, n in per_class.items():
                    out[c] = out.get(c, 0) + n
        return out


def write_manifest(root: Location, manifest: Manifest) -> None:
    """Write ``_manifest.json``, the folder's mark of completion. Writers finish a set with
    :func:`cxrfactory.dataset_card.finish_set`, which writes the dataset card first."""
    root.join(filenames.MANIFEST).write_text(manifest.to_json())


def manifest_from_shards(root: Location, files: Sequence[tuple[str, str]], *, source: str,
                         classes: Sequence[str], config: Any = None,
                         extra: Mapping[str, Any] | None = None, skipped: Sequence[dict] = (),
                         splits: Sequence[str] = (),
                         expected_rows: Mapping[str, int] | None = None) -> Manifest:
    """The manifest of a writer's finished folder, counted from the shards' footers, so a
    resumed run states exactly what exists.

    ``files``: ``(relative path, split)`` of every shard, in the order the manifest lists them;
    a shard's class is its folder's. Rows count towards their split and class; the footers'
    skipped inputs join ``skipped``. A split is listed once a file of it holds a row, and the
    ``splits`` given always are. ``config``: the job's config (a dataclass or a dict), stored
    with tuples as lists. ``expected_rows`` (path -> rows): a file holding another number was
    not written by this plan. A file that is missing is a :class:`ManifestError`.
    """
    counts: dict[str, dict[str, int]] = {s: {c: 0 for c in classes} for s in splits}
    found = list(skipped)
    for rel, split in files:
        loc = root.join(rel)
        if not loc.exists():
            raise ManifestError(f"{loc.uri} was not written; run the same command again")
        rows, file_skipped = shard_footer(loc)
        if expected_rows is not None and rows != expected_rows[rel]:
            raise ManifestError(f"{loc.uri} holds {rows} rows where the plan has "
                                f"{expected_rows[rel]}; it was not written by this run "
                                "(pass --overwrite to start over)")
        if rows or split in counts:
            per_class = counts.setdefault(split, {c: 0 for c in classes})
            per_class[shard_class(rel)] += rows
        found.extend(file_skipped)
    plain = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    return Manifest(source=source, classes=list(classes), counts=counts,
                    files=[rel for rel, _ in files], skipped=found,
                    config={k: (list(v) if isinstance(v, tuple) else v) for k, v in plain.items()},
                    extra=dict(extra or {}))


def manifest_location(root: Location, *, note: bool = True) -> Location:
    """``<root>/_manifest.json``, or a format-1 folder's ``manifest.json`` (with a note on
    migrating it, unless ``note`` is False); a :class:`ManifestError` when there is neither."""
    loc = root.join(filenames.MANIFEST)
    try:
        if loc.exists():
            return loc
        legacy = root.join(filenames.LEGACY_MANIFEST)
        if legacy.exists():
            if note:
                    log.warning("%s is in the shard layout of format 1, which pandas and pyarrow "
                            "cannot open; migrate it in place with: %s %s", root.uri,
                            MIGRATE_COMMAND, root.uri)
            return legacy
    except OSError as exc:
        raise StorageError(f"cannot read {loc.uri}: {exc}") from exc
    raise ManifestError(
        f"{root.uri} has no {filenames.MANIFEST}: not a shard folder, or its writer did not finish "
        "(run the job again to complete it)")


def read_manifest(root: Location, *, verify: bool = True, note: bool = True) -> Manifest:
    """Read ``<root>/_manifest.json``; with ``verify``, refuse it unless every listed shard
    exists. ``note``: say how to migrate a format-1 folder (:func:`manifest_location`)."""
    loc = manifest_location(root, note=note)
    try:
        data = loc.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {loc.uri}: {exc}") from exc
    try:
        manifest = Manifest.from_json(data.decode("utf-8"))
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{loc.uri} is not a valid manifest: {exc}") from exc
    if verify:
        present = set(list_shards(root))
        missing = [f for f in manifest.files if f not in present]
        if missing:
            raise ManifestError(
                f"{root.uri}: the manifest lists {len(missing)} shard(s) that are missing "
                f"(first: {missing[0]}); the folder is incomplete"
            )
    return manifest


def format_count_table(manifest: Manifest) -> str:
    """The per-class / per-split count table the jobs print at the end."""
    splits = [s for s in (*SPLITS, SYNTHETIC_SPLIT) if s in manifest.counts] + sorted(
        s for s in manifest.counts if s not in (*SPLITS, SYNTHETIC_SPLIT)
    )
    width = max([len(c) for c in manifest.classes] + [5])
    header = f"{'class':<{width}} " + " ".join(f"{s:>9}" for s in splits) + f" {'total':>9}"
    lines = [header, "-" * len(header)]
    for c in manifest.classes:
        cells = [manifest.counts.get(s, {}).get(c, 0) for s in splits]
        lines.append(f"{c:<{width}} " + " ".join(f"{n:>9}" for n in cells) + f" {sum(cells):>9}")
    totals = [sum(manifest.counts.get(s, {}).values()) for s in splits]
    lines.append("-" * len(header))
    lines.append(f"{'total':<{width}} " + " ".join(f"{n:>9}" for n in totals)
                 + f" {sum(totals):>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Resumable output folders



class OutputConflictError(UserError, ValueError):
    """The output folder holds something else than what this job would write."""


def fingerprint(identity: dict[str, Any]) -> str:
    """A stable hash of what defines a job's output (config, inputs, plan)."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def prepare_output(root: Location, identity: dict[str, Any], *, overwrite: bool) -> dict[str, Any]:
    """Make ``root`` ready for a resumable writer and say what is already there.

    ``identity`` describes the output (config and the work plan). Returns
    ``{"complete": Manifest | None, "existing": set of shard paths already written}``:
    - a finished folder of the same identity -> ``complete`` is its manifest, nothing to do;
    - a partial folder of the same identity -> ``existing`` lists the shards to keep;
    - anything else in the folder -> :class:`OutputConflictError`, unless ``overwrite``,
      which empties the folder first.
    The identity is recorded in ``_plan.json`` before any shard is written, so an interrupted
    run can be recognised and completed.
    """
    fp = fingerprint(identity)
    if overwrite:
        root.delete_contents()
    manifest_loc, plan_loc = root.join(filenames.MANIFEST), root.join(filenames.PLAN)
    if not manifest_loc.exists() and root.join(filenames.LEGACY_MANIFEST).exists():
        raise OutputConflictError(
            f"{root.uri} holds a finished dataset in the shard layout of format 1; migrate it "
            f"with `{MIGRATE_COMMAND} {root.uri}`, choose another output or pass --overwrite")
    if not manifest_loc.exists() and any(p.startswith("label=") for p in root.list_files(".parquet")):
        raise OutputConflictError(
            f"{root.uri} holds shards of an unfinished run in the layout of format 1 (label=<Class>/ "
            "folders); finish it with the cxrfactory that started it and migrate it, or pass "
            "--overwrite to write it anew")
    if manifest_loc.exists():
        manifest = read_manifest(root, verify=False)
        if manifest.extra.get("fingerprint") == fp:
            read_manifest(root, verify=True)
            return {"complete": manifest, "existing": set(manifest.files)}
        if manifest.extra.get("migrated_from_format"):
            raise OutputConflictError(
                f"{root.uri} holds a finished dataset migrated from shard format 1, whose plan "
                "cannot be matched against this job's settings; use it as it is, choose another "
                "output, or pass --overwrite to write it again")
        raise OutputConflictError(
            f"{root.uri} already holds a finished dataset made with other settings "
            f"(source {manifest.source!r}, created {manifest.created}); choose another output "
            "or pass --overwrite to replace it"
        )
    if plan_loc.exists():
        previous = json.loads(plan_loc.read_text())
        if previous.get("fingerprint") != fp:
            raise OutputConflictError(
                f"{root.uri} holds an unfinished run with other settings "
                f"({_describe_difference(previous.get('identity', {}), identity)}); "
                "rerun with the same settings to complete it, or pass --overwrite"
            )
        return {"complete": None, "existing": set(list_shards(root))}
    if root.list_files():
        raise OutputConflictError(
            f"{root.uri} is not empty and was not written by this job; choose an empty "
            "output or pass --overwrite to replace its contents"
        )
    plan_loc.write_text(json.dumps({"fingerprint": fp, "identity": identity}, indent=1,
                                   default=str))
    return {"complete": None, "existing": set()}


def _describe_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3]
             if len(repr(old.get(k))) < 80 and len(repr(new.get(k))) < 80]
    return "; ".join(shown) or f"differs in {', '.join(keys[:5]) or 'its plan'}"

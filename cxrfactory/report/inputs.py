"""Reading what the report is made from: training runs, shard sets, FDD, utility and audit results.

Every reader takes a location (local path or ``s3://``) and either returns what the report needs
or raises :class:`ReportInputError` saying which flag pointed at what, and what was expected
there. Nothing here starts Ray: the report reads a few small files and a few dozen images, which
plain pyarrow does faster than a cluster could start.
"""

from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from cxrfactory.errors import UserError
from cxrfactory import filenames
from cxrfactory.images import decode_png
from cxrfactory import shards
from cxrfactory.classifier.utility_schema import validate_utility
from cxrfactory.storage import Location, StorageError

# Names inside a training run folder (cxrfactory.gan.loop writes them). Repeated here,
# not imported, so that reading a report does not import the training stack.
RUN_ARTIFACT_DIGEST = "generator/sha256"
FDD_KEYS = ("classes", "classifier", "real", "floor", "floor_mean", "synthetic", "warnings")
AUDIT_KEYS = ("synthetic", "real", "held_out", "rule", "thresholds", "held_out_flag_rate", "flagged",
              "flag_rate", "flagged_total", "flag_rate_total", "per_class")


class ReportInputError(UserError, ValueError):
    """An input that exists but is not what its flag expects (a user mistake: exit status 2)."""


# --------------------------------------------------------------------------------------------
# Training runs


@dataclass(frozen=True)
class RunInfo:
    """What the report shows of one training run folder."""

    uri: str
    name: str  # run_name from config.json, else the folder's name
    config: dict[str, Any]  # the resolved Config.to_dict() ({} when config.json is absent)
    records: list[dict[str, Any]]  # metrics.jsonl, one record per log interval
    loss_curves_png: bytes | None  # the run's own figure, used when there are no records
    last_sample: tuple[str, bytes] | None  # (file name, PNG) of the newest samples/step-*.png
    generator_sha256: str | None  # sha256 of the finished generator artifact, None while training
    total_steps: int | None  # the planned steps, from config.json

    @property
    def arch(self) -> str:
        return str(self.config.get("model", {}).get("arch", "unknown"))

    @property
    def label(self) -> str:
        """``name (arch)``, as figure titles and tables show a run."""
        return f"{self.name} ({self.arch})"


def _json(loc: Location, what: str) -> Any:
    try:
        return json.loads(loc.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportInputError(f"{loc.uri} is not valid JSON ({exc}); expected {what}") from None


def _subfolders_with(loc: Location, name: str) -> list[str]:
    """Immediate subfolders of ``loc`` holding ``name`` (to suggest the folder meant)."""
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False))
    except OSError:
        return []
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory
                  and loc.join(posixpath.basename(i.path), name).exists())


def load_run(loc: Location, flag: str = "--run") -> RunInfo:
    """Read a run folder written by the training loop (``<storage>/<run-name>``)."""
    config_loc, metrics_loc = loc.join(filenames.CONFIG), loc.join(filenames.METRICS)
    has_config, has_metrics = config_loc.is_file(), metrics_loc.is_file()
    if not (has_config or has_metrics):
        runs = _subfolders_with(loc, filenames.CONFIG)
        hint = (f"; it holds the run folder(s) {', '.join(runs[:5])}: pass e.g. "
                f"{flag} {loc.join(runs[0]).uri}" if runs else "")
        raise ReportInputError(f"{flag} {loc.uri} is not a training run folder: it has neither "
                               f"{filenames.CONFIG} nor {filenames.METRICS} (expected <storage>/<run-name> "
                               f"as jobs/train.py writes it){hint}")
    meta: dict[str, Any] = {}
    if has_config:
        meta = _json(config_loc, "the run's config.json")
        if isinstance(meta, dict) and "kind" in meta:  # artifacts (generator/, classifier/) say what they are
            raise ReportInputError(f"{flag} {loc.uri} is a {meta['kind']} artifact, not a training run "
                                   "folder; pass the run folder that holds it")
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ReportInputError(f"{flag} {config_loc.uri} has no 'config' object: it is not "
                                   "the config.json of a training run")
    records = []
    if has_metrics:
        for number, line in enumerate(metrics_loc.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ReportInputError(f"{flag} {metrics_loc.uri} line {number} is not JSON: {exc}") from None
            if not isinstance(record, dict) or "step" not in record:
                raise ReportInputError(f"{flag} {metrics_loc.uri} line {number} has no 'step': "
                                       "not a training metrics log")
            records.append(record)
    curves = loc.join(filenames.LOSS_CURVES)
    samples = [p for p in loc.join(filenames.SAMPLES).list_files(".png")]
    digest = loc.join(RUN_ARTIFACT_DIGEST)
    total = meta.get("total_steps")
    return RunInfo(
        uri=loc.uri,
        name=str(meta.get("run_name") or posixpath.basename(loc.path)),
        config=meta.get("config", {}),
        records=records,
        loss_curves_png=curves.read_bytes() if curves.is_file() else None,
        # step-<7 digits>.png sorts by step: the last name is the newest grid.
        last_sample=(samples[-1], loc.join(filenames.SAMPLES, samples[-1]).read_bytes()) if samples else None,
        generator_sha256=digest.read_text().strip() if digest.is_file() else None,
        total_steps=int(total) if isinstance(total, int) else None,
    )


# --------------------------------------------------------------------------------------------
# Shard sets


@dataclass(frozen=True)
class ShardSet:
    """A shard root and its verified manifest."""

    name: str  # "real", or the --synthetic NAME
    root: Location
    manifest: shards.Manifest

    @property
    def is_synthetic(self) -> bool:
        return self.manifest.source == "synthetic" or shards.SYNTHETIC_SPLIT in self.manifest.counts

    @property
    def plan(self) -> list[dict[str, Any]]:
        """The synthesis plan ``[{class, real, to_generate}]`` (empty when not recorded)."""
        plan = self.manifest.extra.get("plan")
        return list(plan) if isinstance(plan, list) else []

    @property
    def balance_split(self) -> str | None:
        """The real split the synthesis balanced against, if it did."""
        against = self.manifest.extra.get("balance_against")
        return against.get("split") if isinstance(against, dict) else None


def load_shard_set(loc: Location, name: str, *, synthetic: bool, flag: str) -> ShardSet:
    """Read and verify a shard root's manifest; refuse a real set given as synthetic and back."""
    try:
        manifest = shards.read_manifest(loc)
    except shards.ManifestError as exc:
        raise ReportInputError(f"{flag} {loc.uri}: {exc}") from None
    shard_set = ShardSet(name, loc, manifest)
    if synthetic and not shard_set.is_synthetic:
        raise ReportInputError(f"{flag} {name}={loc.uri} holds {manifest.source} images, not a "
                               "synthetic set (pass it as --real)")
    if not synthetic and shard_set.is_synthetic:
        raise ReportInputError(f"{flag} {loc.uri} is a synthetic set; pass it as --synthetic NAME=URI")
    return shard_set


@dataclass
class SampleImages:
    """Per class, the first images of one shard set (by ``image_id``), for Table 2."""

    source: str  # column name: "real" or the synthetic set's name
    split: str
    images: dict[str, list[np.ndarray]] = field(default_factory=dict)  # class -> uint8 (H, W) each


def first_images(shard_set: ShardSet, classes: list[str], split: str, k: int) -> SampleImages:
    """The ``k`` smallest ``image_id`` rows of ``split`` per class, decoded.

    Only the id and split columns of a class's files are read to choose; the image column is
    read from the files that hold a chosen row. The choice does not depend on file order.
    """
    out = SampleImages(shard_set.name, split)
    for label in classes:
        mine = shards.select_files(shard_set.manifest, [label], split)
        candidates: list[tuple[str, str, int]] = []  # (image_id, file, row)
        for rel in mine:
            table = shards.read_shard(shard_set.root.join(rel), columns=["image_id", "split", "label"])
            ids, splits, labels = (table.column(c).to_pylist() for c in ("image_id", "split", "label"))
            candidates += [(i, rel, r) for r, (i, s, lab) in enumerate(zip(ids, splits, labels))
                           if s == split and lab == label]
        chosen = sorted(candidates)[:k]
        by_file: dict[str, list[int]] = {}
        for _, rel, row in chosen:
            by_file.setdefault(rel, []).append(row)
        pixels: dict[tuple[str, int], np.ndarray] = {}
        for rel, rows in by_file.items():
            column = shards.read_shard(shard_set.root.join(rel), columns=["image"]).column("image")
            column = column.combine_chunks().field("bytes")
            for row in rows:
                pixels[(rel, row)] = decode_png(column[row].as_py())
        if chosen:
            out.images[label] = [pixels[(rel, row)] for _, rel, row in chosen]
    return out


# --------------------------------------------------------------------------------------------
# FDD and utility results


def load_fdd(loc: Location, flag: str = "--fdd") -> dict[str, Any]:
    """``fdd.json`` of a jobs/fdd.py output folder (or the file itself)."""
    target = loc if loc.path.endswith(".json") and loc.is_file() else loc.join(filenames.FDD_JSON)
    if not target.is_file():
        raise ReportInputError(f"{flag} {loc.uri} has no {filenames.FDD_JSON}: expected the --out folder "
                               "of jobs/fdd.py")
    result = _json(target, "the FDD result jobs/fdd.py writes")
    missing = [k for k in FDD_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
        raise ReportInputError(f"{flag} {target.uri} lacks {', '.join(missing)}: not an FDD result")
    for name, row in result["synthetic"].items():
        lacking = [k for k in ("fdd", "n", "class_consistency", "fdd_mean") if k not in row]
        if lacking:
            raise ReportInputError(f"{flag} {target.uri}: synthetic set {name!r} lacks {', '.join(lacking)}")
    return result


def load_utility(loc: Location, flag: str = "--utility") -> dict[str, Any]:
    """A ``utility.json`` checked against :mod:`cxrfactory.classifier.utility_schema`."""
    if not loc.is_file():
        raise ReportInputError(f"{flag} {loc.uri} is not a file: expected the utility.json of the "
                               "downstream experiment")
    # Python's json reads the NaN a producer may have written for an undefined AUROC.
    return validate_utility(_json(loc, filenames.UTILITY), source=f"{flag} {loc.uri}")


# --------------------------------------------------------------------------------------------
# Memorization audit


@dataclass(frozen=True)
class AuditInfo:
    """A memorization audit folder as jobs/audit.py leaves it."""

    uri: str  # the folder (what jobs/synthesize.py --exclude-flagged takes)
    record: dict[str, Any]  # audit.json: rule, thresholds, flagged per class, closest pairs
    closest_png: bytes | None  # closest.png (the closest pairs side by side), None when absent


def load_audit(loc: Location, flag: str = "--audit") -> AuditInfo:
    """``audit.json`` (and ``closest.png``) of a jobs/audit.py output folder."""
    target = loc.join(filenames.AUDIT)
    if not target.is_file():
        if loc.is_file():
            raise ReportInputError(f"{flag} {loc.uri} is a file; pass the folder jobs/audit.py wrote "
                                   f"(it holds {filenames.AUDIT}, {filenames.FLAGGED} and {filenames.CLOSEST})")
        audits = _subfolders_with(loc, filenames.AUDIT)
        hint = (f"; it holds {filenames.FDD_JSON}, a jobs/fdd.py result: pass it as --fdd"
                if loc.join(filenames.FDD_JSON).is_file()
                else f"; it holds the audit folder(s) {', '.join(audits[:5])}: pass e.g. "
                     f"{flag} {loc.join(audits[0]).uri}" if audits else "")
        raise ReportInputError(f"{flag} {loc.uri} is not a memorization audit folder: it has no "
                               f"{filenames.AUDIT} (expected the --out folder of jobs/audit.py){hint}")
    record = _json(target, "the memorization audit jobs/audit.py writes")
    missing = [k for k in AUDIT_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise ReportInputError(f"{flag} {target.uri} lacks {', '.join(missing)}: not a memorization audit "
                               "(jobs/audit.py writes audit.json)")
    closest = loc.join(filenames.CLOSEST)
    return AuditInfo(loc.uri, record, closest.read_bytes() if closest.is_file() else None)


# --------------------------------------------------------------------------------------------
# Helpers


def exists(loc: Location, flag: str) -> bool:
    """Whether ``loc`` exists; a store that cannot be reached is an error, not 'missing'."""
    try:
        return loc.exists()
    except OSError as exc:
        raise StorageError(f"{flag} {loc.uri}: cannot be read ({exc})") from exc


def finite(value: Any) -> float | None:
    """A JSON number as float, None for null/NaN (tables show a dash)."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

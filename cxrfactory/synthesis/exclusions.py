"""The images a clean synthetic set leaves out: the flags of memorization audits.

A memorization audit (``jobs/audit.py --out DIR``) of a synthetic set writes ``DIR/audit.json``
(the rule, its thresholds, what was audited) and ``DIR/flagged.parquet`` (one row per synthetic
image too close to a real training image). ``synthesize --exclude-flagged DIR`` reads them here,
before anything is generated:

- the audited set must come from the same generator (sha256) and run seed as this run: a flag
  names an image by its seed, and under another generator or seed that seed is another image;
- the audited set must be the one audited (its manifest's sha256 is in ``audit.json``);
- every flagged id of this run's classes must be the id of an image the audited set holds
  (``syn-<Class>-<seed>`` with ``seed = image_seed(run seed, k, i)``); flags of classes this run
  does not make are ignored;
- the audited set's own exclusions (its manifest's ``audit.excluded``) are excluded again, so
  synthesize -> audit -> synthesize --exclude-flagged never re-admits an image excluded earlier.

No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cxrfactory import filenames
from cxrfactory import labels as L
from cxrfactory import shards
from cxrfactory.storage import Location, StorageError, check_readable, resolve
from cxrfactory.synthesis.plan import ClassPlan, SynthesisError, image_seed

AUDIT_FORMAT = 1
AUDIT_JOB = "jobs/audit.py"
_SYNTHETIC_ID = re.compile(r"^syn-(?P<label>.+)-(?P<seed>\d+)$")


@dataclass(frozen=True)
class Audit:
    """What the manifest records of one audit whose flags a run excluded."""

    uri: str  # the audit folder
    rule: dict[str, Any]  # audit.json's rule (percentile, spaces, description)
    thresholds: dict[str, float]  # audit.json's thresholds per space
    flagged_total: int  # rows of flagged.parquet, every class

    def record(self) -> dict[str, Any]:
        return {"uri": self.uri, "rule": self.rule, "thresholds": self.thresholds,
                "flagged_total": self.flagged_total}


@dataclass(frozen=True)
class Exclusions:
    """The images a run leaves out, and the audits that named them."""

    audits: tuple[Audit, ...] = ()
    image_ids: frozenset[str] = frozenset()  # ids of this run's classes only

    def record(self, plan: Sequence[ClassPlan]) -> dict[str, Any]:
        """The manifest's ``audit`` entry for a plan made with these exclusions."""
        return {"audits": [a.record() for a in self.audits], "excluded": sorted(self.image_ids),
                "replaced": {p.label: p.replaced for p in plan}}


def load_exclusions(uris: Sequence[str], *, classes: Collection[str], vocabulary: Sequence[str],
                    generator_sha256: str, seed: int,
                    s3_endpoint: str | None = None) -> Exclusions:
    """Read and check the audit folders ``uris``; the union of what they exclude.

    ``classes``: this run's classes (flags of other classes are ignored); ``vocabulary``: the
    generator's classes (a class's index is its seed's). A :class:`SynthesisError` names the
    file and what to do when an audit is missing, unreadable or of another generator or seed.
    """
    audits, excluded = [], set()
    for uri in uris:
        audit, ids = _read_audit(uri, set(classes), vocabulary, generator_sha256, seed, s3_endpoint)
        audits.append(audit)
        excluded |= ids
    return Exclusions(tuple(audits), frozenset(excluded))


def manifest_sha256(root: Location) -> str:
    """sha256 of a shard set's manifest file: what an audit records of the set it audited."""
    return hashlib.sha256(shards.manifest_location(root, note=False).read_bytes()).hexdigest()


def _read_audit(uri: str, classes: set[str], vocabulary: Sequence[str], generator_sha256: str,
                seed: int, s3_endpoint: str | None) -> tuple[Audit, set[str]]:
    """One audit folder: its record and the ids it excludes from this run's classes."""
    root = resolve(uri, s3_endpoint)
    try:
        check_readable(root, "--exclude-flagged folder")
    except StorageError as exc:
        raise SynthesisError(f"{exc}; give the --out folder of {AUDIT_JOB} (run it first)") from exc
    summary = _read_summary(root.join(filenames.AUDIT))
    flagged_loc = root.join(filenames.FLAGGED)
    flagged = _read_flagged(flagged_loc)
    counted = sum(int(n) for n in summary["flagged"].values())
    if len(flagged) != counted:
        raise SynthesisError(
            f"{flagged_loc.uri} holds {len(flagged)} row(s) where {filenames.AUDIT} counts "
            f"{counted} flagged: the folder mixes two audits; run {AUDIT_JOB} again")
    audited_uri = summary["synthetic"]["uri"]
    audited = _read_audited_set(uri, audited_uri, summary["synthetic"]["manifest_sha256"],
                                generator_sha256, seed, s3_endpoint)

    # The image indices the audited set holds, per class: [0, its plan + its replacements).
    earlier = audited.extra.get("audit") or {}
    span = {p["class"]: int(p["to_generate"]) + int((earlier.get("replaced") or {}).get(p["class"], 0))
            for p in audited.extra.get("plan", [])}
    seeds: dict[str, set[int]] = {}
    ids = set()
    for image_id, label in flagged:
        parsed_label, parsed_seed = _parse_id(image_id, flagged_loc.uri)
        if parsed_label != label:
            raise SynthesisError(f"{flagged_loc.uri}: row {image_id!r} has the label {label!r}; "
                                 f"not a cxrfactory audit's file, run {AUDIT_JOB} again")
        if label not in classes:
            continue  # a class this run does not make
        if label not in seeds:
            k = L.class_index(label, vocabulary)
            seeds[label] = {image_seed(seed, k, i) for i in range(span.get(label, 0))}
        if parsed_seed not in seeds[label]:
            raise SynthesisError(
                f"{flagged_loc.uri} flags {image_id!r}, which is not an image of the audited set "
                f"{audited_uri} (run seed {seed}): the audit does not belong to that set; run "
                f"{AUDIT_JOB} on it again")
        ids.add(image_id)
    # The audited set's own exclusions stay excluded (they were checked when it was made).
    for image_id in earlier.get("excluded") or []:
        if _parse_id(image_id, audited_uri)[0] in classes:
            ids.add(image_id)
    thresholds = {str(k): float(v) for k, v in summary["thresholds"].items()}
    return Audit(root.uri, dict(summary["rule"]), thresholds, len(flagged)), ids


def _read_summary(loc: Location) -> dict[str, Any]:
    """audit.json, checked for the keys this module reads."""
    fix = f"run {AUDIT_JOB} on the synthetic set first, with --out the folder given here"
    if not _exists(loc):
        raise SynthesisError(f"{loc.uri} is missing: not an audit folder; {fix}")
    try:
        data = json.loads(loc.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SynthesisError(f"{loc.uri} cannot be read as JSON ({exc}); {fix}") from exc
    if not isinstance(data, dict):
        raise SynthesisError(f"{loc.uri} is not an audit summary (a JSON object); {fix}")
    if data.get("format") != AUDIT_FORMAT:
        raise SynthesisError(f"{loc.uri} has audit format {data.get('format')!r}, this cxrfactory "
                             f"reads format {AUDIT_FORMAT}; {fix}")
    checks = [("synthetic", dict), ("rule", dict), ("thresholds", dict), ("flagged", dict)]
    for key, kind in checks:
        if not isinstance(data.get(key), kind):
            raise SynthesisError(f"{loc.uri} has no valid {key!r}; {fix}")
    for key in ("uri", "manifest_sha256"):
        if not isinstance(data["synthetic"].get(key), str):
            raise SynthesisError(f"{loc.uri} has no valid 'synthetic.{key}'; {fix}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in [*data["thresholds"].values(), *data["flagged"].values()]):
        raise SynthesisError(f"{loc.uri}: 'thresholds' and 'flagged' must hold numbers; {fix}")
    return data


def _read_flagged(loc: Location) -> list[tuple[str, str]]:
    """flagged.parquet -> ``[(image_id, label), ...]``."""
    fix = f"run {AUDIT_JOB} again to write the audit folder anew"
    if not _exists(loc):
        raise SynthesisError(f"{loc.uri} is missing: the audit did not finish; {fix}")
    try:
        table = pq.read_table(loc.path, filesystem=loc.fs)
    except (OSError, pa.ArrowException) as exc:
        raise SynthesisError(f"{loc.uri} cannot be read as Parquet ({exc}); {fix}") from exc
    for column in ("image_id", "label"):
        if column not in table.column_names or not pa.types.is_string(table.schema.field(column).type):
            raise SynthesisError(f"{loc.uri} has no string column {column!r}; {fix}")
    rows = list(zip(table.column("image_id").to_pylist(), table.column("label").to_pylist()))
    if any(image_id is None or label is None for image_id, label in rows):
        raise SynthesisError(f"{loc.uri} has a row without image_id or label; {fix}")
    return rows


def _read_audited_set(audit_uri: str, uri: str, recorded_sha: str, generator_sha256: str,
                      seed: int, s3_endpoint: str | None) -> shards.Manifest:
    """The audited set's manifest, refused unless it is what was audited and of this run's
    generator and seed."""
    root = resolve(uri, s3_endpoint)
    where = f"the set audited in {audit_uri} ({uri})"
    try:
        manifest = shards.read_manifest(root, verify=False, note=False)
        sha = manifest_sha256(root)
    except (shards.ManifestError, StorageError) as exc:
        raise SynthesisError(f"{where} cannot be read: {exc}") from exc
    if sha != recorded_sha:
        raise SynthesisError(f"{where} has changed since it was audited (its {filenames.MANIFEST} "
                             f"differs); run {AUDIT_JOB} on it again")
    made_by, made_with = manifest.extra.get("generator"), manifest.extra.get("seed")
    if manifest.source != "synthetic" or made_by is None:
        raise SynthesisError(f"{where} is not a synthetic set; audit the synthetic set this "
                             "generator made")
    if made_by != generator_sha256:
        raise SynthesisError(
            f"{where} was made by generator {str(made_by)[:12]}…, not by this one "
            f"({generator_sha256[:12]}…): its flags name other images. Audit a set of this "
            "generator, or synthesize with the generator that was audited")
    if made_with != seed:
        raise SynthesisError(
            f"{where} was made with --seed {made_with}, this run has --seed {seed}: its flags "
            f"name other images. Synthesize with --seed {made_with}, or audit a set of seed {seed}")
    return manifest


def _parse_id(image_id: str, where: str) -> tuple[str, int]:
    match = _SYNTHETIC_ID.match(image_id)
    if match is None:
        raise SynthesisError(f"{where}: {image_id!r} is not a synthetic image id "
                             "(syn-<Class>-<seed>); the audit is not of a synthetic set")
    return match["label"], int(match["seed"])


def _exists(loc: Location) -> bool:
    try:
        return loc.is_file()
    except OSError as exc:
        raise SynthesisError(f"cannot read {loc.uri}: {exc}") from exc


def exclusion_summary(exclusions: Exclusions, plan: Sequence[ClassPlan]) -> str:
    """One log line: how many images the audits exclude and how many this plan replaces."""
    replaced = sum(p.replaced for p in plan)
    return (f"excluding {len(exclusions.image_ids)} flagged image(s) of {len(exclusions.audits)} "
            f"audit(s); {replaced} of them in this run's range, replaced from further seeds")


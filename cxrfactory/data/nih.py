"""NIH ChestX-ray14 (or a phantom folder in the same layout) -> Parquet shards by split and class.

The folder layout is the one NIH's tarballs unpack to::

    <root>/Data_Entry_2017*.csv[.gz]
    <root>/images/*.png  or  <root>/images_001/images/*.png, images_002/images/*.png, ...
    <root>/train_val_list.txt, test_list.txt      (optional: NIH's official split)

Selection: by default only single-label rows whose one finding is a selected class (the
paper's one-hot condition needs one class per image; ``No Finding`` is ``Normal``). With
``include_multilabel`` every row with at least one selected finding is kept; its ``label`` is
its first selected finding in vocabulary order and ``findings`` lists all of them.

Split: patient-wise, never a patient in two splits. NIH's official lists when both files are
present (``test_list.txt`` -> test; ``train_val_list.txt`` -> train/val, val drawn by patient),
else a deterministic split by a hash of the patient id (about 70/10/20, as the paper's
78,468 / 11,219 / rest).

Writing: the plan (which image goes to which shard) is fixed before any image is read; Ray Data
runs one task per shard, each reads, resizes (antialiased) and encodes its images and writes its
file atomically. A rerun skips the shards that exist; the manifest is written last.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from cxrfactory.dataset_card import finish_set
from cxrfactory.errors import UserError
from cxrfactory import filenames
from cxrfactory.images import encode_png, to_grayscale
from cxrfactory import labels as L
from cxrfactory import shards
from cxrfactory.storage import Location, check_writable, resolve

REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID")
OPTIONAL_COLUMNS = ("Follow-up #", "Patient Age", "Patient Gender", "View Position")


class IngestError(UserError, ValueError):
    """Input that cannot be ingested, with what was expected."""


@dataclass(frozen=True)
class IngestConfig:
    """Everything that defines an ingest's output."""

    nih_root: str  # folder in NIH's layout (local)
    out: str  # shard root: local path or s3://bucket/prefix
    resolution: int = 256  # output side in px (square, antialiased resize)
    classes: tuple[str, ...] = L.DEFAULT_CLASSES  # classes to keep, vocabulary order
    include_multilabel: bool = False  # keep rows with several findings (label = first class)
    rows_per_file: int = 1000  # rows per Parquet shard
    val_fraction: float = 0.1  # of patients, when no official lists exist
    test_fraction: float = 0.2  # of patients, when no official lists exist
    s3_endpoint: str | None = None  # S3-compatible endpoint (else CXRF_S3_ENDPOINT / AWS)
    overwrite: bool = False  # replace whatever the output holds
    command: str | None = None  # the command line that asked for it (for the dataset card)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", L.validate_classes(self.classes))
        if self.resolution < 8:
            raise IngestError(f"--resolution must be at least 8 px, got {self.resolution}")
        if self.rows_per_file < 1:
            raise IngestError(f"--rows-per-file must be positive, got {self.rows_per_file}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1
                and self.val_fraction + self.test_fraction < 1):
            raise IngestError("val and test fractions must be in [0, 1) and sum below 1")


@dataclass
class ShardTask:
    """One output file: which rows go into it."""

    path: str  # relative to the output root: <split>/<Class>/part-NNNNN.parquet
    split: str
    label: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # image_id, file, findings, split, patient_id


# ---------------------------------------------------------------------------------------------
# Reading the folder


def find_metadata_csv(root: Path) -> Path:
    """``Data_Entry_2017*.csv`` (or ``.csv.gz``) in ``root``; the newest-named one wins."""
    candidates = sorted(root.glob("Data_Entry_2017*.csv")) + sorted(
        root.glob("Data_Entry_2017*.csv.gz")
    )
    if not candidates:
        raise IngestError(
            f"{root} has no Data_Entry_2017*.csv: expected NIH's metadata file (e.g. "
            "Data_Entry_2017_v2020.csv) next to the images/ folder(s)"
        )
    return candidates[-1]


def read_metadata(csv_path: Path) -> pd.DataFrame:
    """NIH's metadata CSV, validated: an error names any missing column."""
    try:
        df = pd.read_csv(csv_path, dtype={"Image Index": str, "Finding Labels": str})
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, EOFError) as exc:
        raise IngestError(f"cannot read {csv_path}: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise IngestError(
            f"{csv_path} lacks column(s) {missing}; NIH's columns are "
            f"{', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}, ..."
        )
    return df


def find_images(root: Path) -> dict[str, Path]:
    """Image file name -> path, from ``images/`` and ``images_NNN/images/`` (NIH's tarballs)."""
    folders = [root / "images"] + sorted(p / "images" for p in root.glob("images_*"))
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.lower().endswith(".png"):
                        found.setdefault(entry.name, Path(entry.path))
    return found


# ---------------------------------------------------------------------------------------------
# Selecting and splitting


def select_rows(df: pd.DataFrame, classes: tuple[str, ...], include_multilabel: bool) -> pd.DataFrame:
    """Rows whose findings map into ``classes``, with ``label`` and ``findings`` columns."""
    findings = df["Finding Labels"].fillna("").map(L.parse_findings)
    in_vocab = findings.map(lambda fs: [L.nih_to_class(f) for f in fs] or ["Normal"])
    if include_multilabel:
        keep = in_vocab.map(lambda names: any(n in classes for n in names))
        label = in_vocab.map(lambda names: next((c for c in classes if c in names), None))
    else:
        keep = in_vocab.map(lambda names: len(names) == 1 and names[0] in classes)
        label = in_vocab.map(lambda names: names[0])
    out = pd.DataFrame(
        {
            "image_id": df["Image Index"].astype(str),
            "label": label,
            "findings": findings,
            "patient_id": pd.to_numeric(df["Patient ID"], errors="coerce"),
        }
    )[keep.to_numpy()]
    bad = out["patient_id"].isna()
    if bad.any():
        raise IngestError(
            f"{int(bad.sum())} row(s) have a non-numeric Patient ID (first: "
            f"{out.loc[bad, 'image_id'].iloc[0]}); NIH's Patient ID is an integer"
        )
    out["patient_id"] = out["patient_id"].astype(np.int64)
    return out.reset_index(drop=True)


def patient_fraction(patient_id: int, salt: str = "cxrfactory-split") -> float:
    """A uniform number in [0, 1) that depends on the patient alone (stable across runs)."""
    digest = hashlib.sha256(f"{salt}:{int(patient_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(rows: pd.DataFrame, root: Path, val_fraction: float, test_fraction: float) -> pd.Series:
    """``train`` / ``val`` / ``test`` per row, patient-wise."""
    u = rows["patient_id"].map(patient_fraction)
    official_test, official_trainval = root / "test_list.txt", root / "train_val_list.txt"
    if official_test.is_file() and official_trainval.is_file():
        test_ids = set(official_test.read_text().split())
        is_test = rows["image_id"].isin(test_ids)
        # NIH's lists are patient-wise already; val is drawn from train_val by patient, as
        # the paper's 78,468 / 11,219 (val = 1/8 of train_val).
        split = np.where(is_test, "test", np.where(u < 0.125, "val", "train"))
        # A patient must not straddle test and train/val, even if a user's list is sloppy.
        test_patients = set(rows.loc[is_test, "patient_id"])
        straddle = rows["patient_id"].isin(test_patients) & ~is_test
        if straddle.any():
            raise IngestError(
                f"{official_test.name} splits patient {int(rows.loc[straddle, 'patient_id'].iloc[0])} "
                "between test and train/val; the lists must be patient-wise"
            )
        return pd.Series(split, index=rows.index)
    split = np.where(u < test_fraction, "test",
                     np.where(u < test_fraction + val_fraction, "val", "train"))
    return pd.Series(split, index=rows.index)


def plan_shards(rows: pd.DataFrame, classes: tuple[str, ...], rows_per_file: int) -> list[ShardTask]:
    """Deterministic shard plan: per split and class, rows sorted by image_id, R rows a file.

    A file holds one split, so a reader of one split opens only its files, and Hugging Face
    ``datasets`` finds the splits in the folder names.
    """
    tasks: list[ShardTask] = []
    for split in shards.SPLITS:
        for label in classes:
            part = rows[(rows["split"] == split) & (rows["label"] == label)].sort_values("image_id")
            records = part[["image_id", "file", "findings", "split", "patient_id"]].to_dict("records")
            for k, start in enumerate(range(0, len(records), rows_per_file)):
                tasks.append(ShardTask(shards.shard_path(split, label, k), split, label,
                                       records[start:start + rows_per_file]))
    return tasks


# ---------------------------------------------------------------------------------------------
# Writing


def load_resized(path: str, resolution: int) -> np.ndarray:
    """Read any PNG NIH ships (L, RGBA, 16-bit) and resize with antialiasing to a square."""
    with Image.open(path) as img:
        img.load()  # decode now: truncated files fail here, not later
        gray = to_grayscale(img)
        if gray.size != (resolution, resolution):
            gray = gray.resize((resolution, resolution), Image.Resampling.LANCZOS,
                               reducing_gap=3.0)
        return np.asarray(gray)


def write_shard_task(task: dict[str, Any], *, out: str, resolution: int, source: str,
                     s3_endpoint: str | None) -> dict[str, Any]:
    """Ray task body: read, resize, encode one shard's images and write the file atomically."""
    rows, skipped = [], []
    for rec in task["rows"]:
        try:
            pixels = load_resized(rec["file"], resolution)
        except FileNotFoundError:
            skipped.append({"path": rec["file"], "reason": "missing"})
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            skipped.append({"path": rec["file"], "reason": f"unreadable: {exc}"})
            continue
        rows.append({
            "image_id": rec["image_id"],
            "image": {"bytes": encode_png(pixels), "path": rec["image_id"]},
            "label": task["label"],
            "findings": [L.nih_to_class(f) for f in rec["findings"]],
            "split": rec["split"],
            "patient_id": int(rec["patient_id"]),
            "source": source,
            "seed": None,
            "generator": None,
            "height": resolution,
            "width": resolution,
        })
    root = resolve(out, s3_endpoint)
    shards.write_shard(root.join(task["path"]), shards.make_table(rows), skipped)
    return {"path": task["path"], "written": len(rows), "skipped": len(skipped)}


def detect_source(root: Path) -> str:
    """``phantom`` for a folder written by ``make_phantoms`` (it leaves ``phantom.json``)."""
    return "phantom" if (root / "phantom.json").is_file() else "nih"


def check_source(nih_root: str) -> tuple[Path, Path]:
    """Fail fast, before any work, when the input folder is not in NIH's layout."""
    root = Path(nih_root).expanduser()
    if not root.is_dir():
        raise IngestError(f"--nih-root {root} is not a folder; point it at the unpacked "
                          "ChestX-ray14 download (or a make_phantoms output)")
    return root, find_metadata_csv(root)


@dataclass
class IngestRun:
    """A validated, planned ingest whose output folder is ready (:func:`prepare_ingest`)."""

    config: IngestConfig
    out: Location
    source: str  # "nih" or "phantom"
    tasks: list[ShardTask]  # every shard of the finished set
    todo: list[ShardTask]  # the shards still missing
    identity: dict[str, Any]  # what the output's fingerprint is made of
    skipped: list[dict]  # rows listed in the CSV whose image is missing
    complete: shards.Manifest | None  # the manifest when the folder is already finished


def prepare_ingest(config: IngestConfig, log: Callable[[str], None] = print) -> IngestRun:
    """Read and check the CSV, find the images, plan the shards and make the output ready:
    every check on the input, before Ray starts (no Ray here)."""
    root, csv_path = check_source(config.nih_root)
    metadata = read_metadata(csv_path)
    images = find_images(root)
    if not images:
        raise IngestError(f"{root} has no images: expected {root}/images/*.png or "
                          f"{root}/images_001/images/*.png ...")
    source = detect_source(root)

    rows = select_rows(metadata, config.classes, config.include_multilabel)
    rows["split"] = assign_splits(rows, root, config.val_fraction, config.test_fraction)
    rows["file"] = rows["image_id"].map(lambda name: str(images[name]) if name in images else None)
    missing = rows[rows["file"].isna()]
    skipped = [{"path": name, "reason": "missing"} for name in missing["image_id"]]
    rows = rows[rows["file"].notna()]
    if rows.empty:
        raise IngestError(f"no image of {csv_path.name} matches the classes "
                          f"{', '.join(config.classes)} and exists under {root}")
    log(f"[ingest] {csv_path.name}: {len(metadata)} rows, {len(rows)} selected, "
        f"{len(missing)} listed but missing, source={source}")

    tasks = plan_shards(rows, config.classes, config.rows_per_file)
    identity = {
        "kind": "ingest", "source": source, "resolution": config.resolution,
        "classes": list(config.classes), "include_multilabel": config.include_multilabel,
        "rows_per_file": config.rows_per_file,
        "plan": shards.fingerprint({t.path: [r["image_id"] + ":" + r["split"] for r in t.rows]
                                    for t in tasks}),
    }
    out = resolve(config.out, config.s3_endpoint)
    check_writable(out)
    state = shards.prepare_output(out, identity, overwrite=config.overwrite)
    todo = [t for t in tasks if t.path not in state["existing"]]
    return IngestRun(config, out, source, tasks, todo, identity, skipped, state["complete"])


def run_ingest(run: IngestRun, log: Callable[[str], None] = print) -> shards.Manifest:
    """Write the missing shards on Ray Data (Ray must be up, or starts locally), then the
    manifest; returns it."""
    config, out = run.config, run.out
    if run.complete is not None:
        log(f"[ingest] {out.uri} is already complete; nothing to do")
        log(shards.format_count_table(run.complete))
        return run.complete
    log(f"[ingest] {len(run.tasks)} shard(s) planned, {len(run.tasks) - len(run.todo)} already "
        f"written, {len(run.todo)} to write")
    if run.todo:
        import ray  # the only Ray use here: the parallel shard writer

        started = time.time()
        results = (
            ray.data.from_items([asdict(t) for t in run.todo], override_num_blocks=len(run.todo))
            .map(write_shard_task, num_cpus=1, fn_kwargs={
                "out": config.out, "resolution": config.resolution, "source": run.source,
                "s3_endpoint": config.s3_endpoint})
            .take_all()
        )
        n = sum(r["written"] for r in results)
        log(f"[ingest] wrote {len(results)} shard(s), {n} images in {time.time() - started:.1f}s")

    # Counts come from the files themselves, so a resumed run reports exactly what exists.
    manifest = shards.manifest_from_shards(
        out, [(t.path, t.split) for t in run.tasks], source=run.source, classes=config.classes,
        config=config, skipped=run.skipped,
        extra={"fingerprint": shards.fingerprint(run.identity), "resolution": config.resolution,
               "command": config.command})
    finish_set(out, manifest)
    bad = len(manifest.skipped)
    log(f"[ingest] {out.uri}: {manifest.total()} images"
        + (f", {bad} skipped (listed in {filenames.MANIFEST})" if bad else ""))
    log(shards.format_count_table(manifest))
    return manifest


def ingest(config: IngestConfig, log: Callable[[str], None] = print) -> shards.Manifest:
    """Run the whole ingest: :func:`prepare_ingest` then :func:`run_ingest`; returns the
    manifest (also written to ``<out>/_manifest.json``)."""
    return run_ingest(prepare_ingest(config, log), log)

"""Procedural PA chest X-ray phantoms with measurable disease signatures, in NIH's layout.

Real ChestX-ray14 images cannot be downloaded everywhere, so this module writes folders of
radiograph-like phantoms in NIH's layout (``images/<Image Index>.png``, 8-bit grayscale, and
``Data_Entry_2017.csv`` with NIH's columns); the same ingest then serves phantoms and real data.
Brightness follows attenuation: air black, lungs dark, soft tissue grey, heart, mediastinum and
bones bright.

Anatomy: body outline and soft tissue, trachea, spine, clavicles, curved posterior ribs, two
lung fields with vessel markings radiating from the hila, an aortic knob, the heart (mostly to
the patient's left), diaphragm domes (the right one higher), exposure (gain, offset, gamma) and
quantum noise. A patient's anatomy (thorax size, heart size, dome heights, ribs, vessels) comes
from ``patient_seed``, so one patient's follow-ups look like the same person; pose (rotation,
shift, scale), exposure, noise and lesions come from the image's own ``seed``. Sizes in cm
assume that the image spans 43 cm, as NIH's 1024-px images do.

Signatures (:mod:`cxrfactory.data.phantom_measure` measures each one; its ``predict_class``
classifies by rules on the measurements):

============  ==============================================================  ===================
class         what is drawn                                                   measured as
============  ==============================================================  ===================
Normal        cardiothoracic ratio (CTR) 0.36-0.45, sharp costophrenic        ``ctr`` < 0.5 and
              angles, vessel markings out to the chest wall                   no other sign
Cardiomegaly  the heart widened to CTR 0.57-0.68                              ``ctr`` > 0.5
Effusion      fluid in one or both costophrenic recesses: a basal opacity     ``effusion`` > 0
              whose meniscus rises laterally, over the dome                   (lateral base rise)
Pneumothorax  one lung collapsed towards its hilum (to 55-72 %): a lucent     ``pneumothorax``
              apical and lateral rim without markings, a thin pleural line    (lucent fraction)
Nodule        1-3 round sharp opacities of 2.3-2.9 cm (under 3 cm; 3.4 px at  ``nodule_count``,
              64 px), apart from each other                                   ``lesion_cm`` < 3
Mass          one dense lobulated opacity of 4.5-6 cm (over 3 cm)             ``lesion_cm`` > 3,
                                                                              ``lesion_contrast``
Pneumonia     a lobar-shaped consolidation (6-7.5 cm, ill-defined, one sharp  ``consolidation_
              fissure margin), fainter than a mass, crossed by dark air       cm2``
              bronchograms, sparing a rim of aerated lung
Infiltration  a diffuse reticulonodular (~1 cm) haze over large patchy parts  ``infiltration``
              of one or both lungs                                            (hazy fraction)
Atelectasis   volume loss (one hemidiaphragm raised by 6-8 % of the image     ``plate_cm``,
              height, the mediastinum shifted towards it) and a plate-like    ``base_asymmetry``
              band opacity (5-7 x 1.4-1.8 cm) in that lung
============  ==============================================================  ===================

A multi-label spec carries every one of its signatures. NIH findings outside the 9 classes
(Consolidation, Edema, Emphysema, Fibrosis, Hernia, Pleural_Thickening) each draw one mild
generic opacity (a faint smooth patch in a random lung zone) and nothing specific. An AP view
magnifies the heart by 4 % (a normal heart stays under CTR 0.5), raises the clavicles and
lowers the contrast a little. Lesions keep a rim of aerated lung around them, so they read as
opacities inside the lung at 64 px too.

Lesion positions come from NIH's bounding boxes (BBox_List_2017, 1024-px coordinates) when the
image has a box for the finding (moved inside the phantom's lung when the box centre falls
outside it; a Cardiomegaly box sets the heart's width, an Effusion or Pneumothorax box the
side), else they are sampled.

Every image is a pure function of its :class:`PhantomSpec`, whose seeds derive from the run seed
and the image's position only, so a folder's bytes do not depend on the number of workers.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cxrfactory.errors import UserError
from cxrfactory import filenames
from cxrfactory import labels as L
from cxrfactory.data.phantom_anatomy import (
    CM_PER_IMAGE,
    MIN_RESOLUTION,
    RENDERER_VERSION,
    LesionBox,
    PhantomSpec,
)
from cxrfactory.data.phantom_render import render
from cxrfactory.images import PNG_COMPRESS_LEVEL, encode_png
from cxrfactory.storage import is_temporary, resolve

__all__ = [
    "CSV_NAME", "MIN_RESOLUTION", "NIH_HEADER", "NIH_SINGLE_LABEL_COUNTS",
    "LesionBox", "PhantomConfig", "PhantomError", "PhantomSpec",
    "is_phantom_folder", "make_phantom_folder", "packaged_bboxes", "packaged_metadata",
    "read_bboxes", "render", "sample_specs", "specs_from_metadata", "write_phantom_folder",
]

#: NIH's single-label image counts per class (Data_Entry_2017_v2020): the default prevalence.
NIH_SINGLE_LABEL_COUNTS: dict[str, int] = {
    "Normal": 60361, "Infiltration": 9547, "Atelectasis": 4215, "Effusion": 3955,
    "Nodule": 2705, "Pneumothorax": 2194, "Mass": 2139, "Cardiomegaly": 1093, "Pneumonia": 322,
}
#: The metadata file of a phantom folder (the name NIH's loaders look for).
CSV_NAME = "Data_Entry_2017.csv"
#: NIH's header, verbatim: its bracketed names hold commas, so they read as two columns each.
NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")

_REQUIRED = ("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
             "Patient Gender", "View Position")


class PhantomError(UserError, ValueError):
    """Input that cannot become a phantom folder, with what was expected."""


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

def _derived_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (fits Parquet's int64 and NumPy's generators)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def _image_seed(seed: int, index: int) -> int:
    return _derived_seed(seed, 0, index)


def _patient_seed(seed: int, patient_id: int) -> int:
    return _derived_seed(seed, 1, patient_id)


def sample_specs(num_images: int, *, seed: int = 0, classes: Sequence[str] | None = None,
                 balanced: bool = False, min_per_class: int = 0) -> list[PhantomSpec]:
    """``num_images`` single-finding specs with plausible patients.

    Classes follow NIH's single-label prevalence (restricted to ``classes``), or are drawn
    evenly (exact counts, shuffled) when ``balanced``. Patients have 1-6 follow-ups (about 1.8
    on average), an age of 18-90 that grows with the follow-ups, NIH's gender ratio (56 % male)
    and 60 % PA views. ``min_per_class`` keeps NIH's skew but guarantees every class that
    many images (a small NIH-like set would otherwise have no Pneumonia at all).
    """
    if num_images <= 0:
        raise PhantomError(f"the number of images must be positive, got {num_images}")
    chosen = L.validate_classes(classes)
    rng = np.random.default_rng([seed, 0x5BEC])
    if balanced:
        picks = rng.permutation(np.arange(num_images) % len(chosen))
    else:
        if min_per_class * len(chosen) > num_images:
            raise PhantomError(f"--min-per-class {min_per_class} x {len(chosen)} classes exceeds "
                               f"--num-images {num_images}")
        weights = np.array([NIH_SINGLE_LABEL_COUNTS[c] for c in chosen], dtype=np.float64)
        floor = np.repeat(np.arange(len(chosen)), min_per_class)
        drawn = rng.choice(len(chosen), size=num_images - floor.size, p=weights / weights.sum())
        picks = rng.permutation(np.concatenate([floor, drawn])) if floor.size else drawn
    specs: list[PhantomSpec] = []
    patient_id = 0
    while len(specs) < num_images:
        patient_id += 1
        visits = min(int(rng.geometric(0.55)), 6, num_images - len(specs))
        age = int(np.clip(round(rng.normal(47.0, 16.0)), 18, 88))
        gender = "M" if rng.random() < 0.56 else "F"
        for follow_up in range(visits):
            index = len(specs)
            name = chosen[int(picks[index])]
            specs.append(PhantomSpec(
                image_id=f"{patient_id:08d}_{follow_up:03d}.png",
                patient_id=patient_id, follow_up=follow_up, age=age, gender=gender,
                view="PA" if rng.random() < 0.6 else "AP",
                findings=() if name == "Normal" else (name,),
                seed=_image_seed(seed, index), patient_seed=_patient_seed(seed, patient_id)))
            age += int(rng.integers(0, 2))
    return specs


def packaged_metadata() -> Path:
    """NIH's real metadata (Data_Entry_2017_v2020.csv.gz) shipped with the package."""
    return Path(str(resources.files("cxrfactory.data") / "nih_metadata"
                    / "Data_Entry_2017_v2020.csv.gz"))


def packaged_bboxes() -> Path:
    """NIH's bounding-box list (BBox_List_2017.csv.gz) shipped with the package."""
    return Path(str(resources.files("cxrfactory.data") / "nih_metadata" / "BBox_List_2017.csv.gz"))


def _open_text(path: Path):
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def read_bboxes(path: str | os.PathLike[str]) -> dict[str, tuple[LesionBox, ...]]:
    """NIH's BBox_List_2017 (csv or csv.gz): Image Index -> its boxes."""
    path = Path(path)
    if not path.is_file():
        raise PhantomError(f"bounding-box file {path} does not exist")
    boxes: dict[str, list[LesionBox]] = {}
    try:
        with _open_text(path) as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            if header[:2] != ["Image Index", "Finding Label"]:
                raise PhantomError(f"{path} does not start with NIH's BBox_List_2017 header "
                                   f"'Image Index,Finding Label,Bbox [x,y,w,h]', got {header[:3]}")
            for row in reader:
                if len(row) < 6:
                    continue
                finding = "Infiltration" if row[1] == "Infiltrate" else row[1]
                x, y, w, h = (float(v) for v in row[2:6])
                boxes.setdefault(row[0], []).append(LesionBox(finding, x, y, w, h))
    except (OSError, ValueError, EOFError, csv.Error) as exc:
        if isinstance(exc, PhantomError):
            raise
        raise PhantomError(f"cannot read bounding boxes from {path}: {exc}") from exc
    return {name: tuple(found) for name, found in boxes.items()}


def _metadata_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of NIH's metadata CSV, checked for the columns a phantom needs."""
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in _REQUIRED if name not in header]
        if missing:
            raise PhantomError(f"{path} lacks NIH column(s) {missing}; its header must start "
                               f"like NIH's: {NIH_HEADER}")
        position = {name: header.index(name) for name in _REQUIRED}
        for line, row in enumerate(reader, start=2):
            if row:
                yield line, {name: row[i] if i < len(row) else "" for name, i in position.items()}


def specs_from_metadata(csv_path: str | os.PathLike[str],
                        bbox_csv: str | os.PathLike[str] | None = None,
                        num_images: int | None = None, seed: int = 0,
                        classes: Sequence[str] | None = None) -> list[PhantomSpec]:
    """One spec per row of a NIH metadata CSV (csv or csv.gz): its Image Index, patient,
    follow-up, age, gender, view and findings, with NIH's boxes (``bbox_csv``, default the
    packaged list) placing the lesions.

    ``num_images`` keeps the first rows (all when None); ``classes`` keeps only rows whose every
    finding (``No Finding`` = Normal) is among them.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise PhantomError(f"metadata file {path} does not exist")
    if num_images is not None and num_images <= 0:
        raise PhantomError(f"the number of images must be positive, got {num_images}")
    wanted = None if classes is None else set(L.validate_classes(classes))
    boxes = read_bboxes(packaged_bboxes() if bbox_csv is None else bbox_csv)
    specs: list[PhantomSpec] = []
    seen: set[str] = set()
    try:
        for line, row in _metadata_rows(path):
            findings = tuple(L.parse_findings(row["Finding Labels"]))
            if wanted is not None and not {L.nih_to_class(f) for f in findings or
                                           (L.NIH_NO_FINDING,)} <= wanted:
                continue
            image_id = row["Image Index"].strip()
            if not image_id or image_id in seen or "/" in image_id or not image_id.endswith(".png"):
                raise PhantomError(f"{path}:{line}: bad or repeated Image Index {image_id!r}")
            seen.add(image_id)
            patient_id = int(row["Patient ID"])
            specs.append(PhantomSpec(
                image_id=image_id, patient_id=patient_id,
                follow_up=int(row["Follow-up #"]),
                age=int(row["Patient Age"].strip().rstrip("YyMmDd") or 0),  # 2017's "058Y" too
                gender=row["Patient Gender"].strip() or "M",
                view=row["View Position"].strip() or "PA",
                findings=findings, boxes=boxes.get(image_id, ()),
                seed=_image_seed(seed, len(specs)), patient_seed=_patient_seed(seed, patient_id)))
            if num_images is not None and len(specs) == num_images:
                break
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as exc:
        raise PhantomError(f"cannot read {path}: {exc}") from exc
    except ValueError as exc:
        if isinstance(exc, PhantomError):
            raise
        raise PhantomError(
            f"{path}: a row holds a non-numeric id, follow-up or age: {exc}") from exc
    if not specs:
        raise PhantomError(f"{path} has no row to render" +
                           (f" among classes {sorted(wanted)}" if wanted else ""))
    return specs


@dataclass(frozen=True)
class PhantomConfig:
    """What a phantom folder is made from; saved in its ``phantom.json``."""

    num_images: int | None = None  # images to write; with metadata the first rows (None: all)
    resolution: int = 256  # image side, px
    seed: int = 0  # run seed: each image's seeds derive from it and the image's position
    classes: tuple[str, ...] | None = None  # classes to draw, vocabulary order (None: all)
    balanced: bool = False  # draw the classes evenly instead of by NIH's prevalence
    min_per_class: int = 0  # with NIH's prevalence, at least this many images of every class
    metadata: str | None = None  # NIH metadata csv[.gz] rendered row by row ("nih": packaged)
    bbox: str | None = None  # NIH BBox_List csv[.gz] for metadata mode (None: packaged)

    def __post_init__(self) -> None:
        if self.classes is not None:
            object.__setattr__(self, "classes", L.validate_classes(self.classes))
        if self.num_images is None and self.metadata is None:
            raise PhantomError("--num-images is required unless --metadata is given")
        if self.num_images is not None and self.num_images <= 0:
            raise PhantomError(f"--num-images must be positive, got {self.num_images}")
        if self.resolution < MIN_RESOLUTION:
            raise PhantomError(
                f"--resolution must be at least {MIN_RESOLUTION} px, got {self.resolution}")
        if self.metadata is None and self.bbox is not None:
            raise PhantomError("--bbox only applies with --metadata")
        if self.min_per_class < 0 or (self.min_per_class and (self.balanced or self.metadata)):
            raise PhantomError("--min-per-class must be >= 0 and applies to NIH's prevalence only "
                               "(not with --balanced or --metadata)")
        if self.metadata is not None and self.balanced:
            raise PhantomError("--balanced draws the classes itself; it cannot be combined "
                               "with --metadata")
        for flag, path in (("--metadata", self.metadata_path), ("--bbox", self.bbox)):
            if path is not None and not Path(path).is_file():
                raise PhantomError(f"{flag} {path} does not exist")

    @property
    def metadata_path(self) -> Path | None:
        """The metadata file ("nih" resolved to the packaged one)."""
        if self.metadata is None:
            return None
        return packaged_metadata() if self.metadata == "nih" else Path(self.metadata)

    def specs(self) -> list[PhantomSpec]:
        """The specs this config describes."""
        if self.metadata_path is not None:
            return specs_from_metadata(self.metadata_path, self.bbox, self.num_images,
                                       self.seed, self.classes)
        assert self.num_images is not None  # checked in __post_init__
        return sample_specs(self.num_images, seed=self.seed, classes=self.classes,
                            balanced=self.balanced, min_per_class=self.min_per_class)


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------

def _render_chunk(specs: Sequence[PhantomSpec], resolution: int, images_dir: str) -> int:
    """Render, encode and write a chunk of specs (runs in a worker process)."""
    folder = Path(images_dir)
    for spec in specs:
        resolve(folder / spec.image_id).write_bytes(encode_png(render(spec, resolution)))
    return len(specs)


def _csv_bytes(specs: Sequence[PhantomSpec], resolution: int) -> bytes:
    """NIH's metadata for the specs; the image is its own original, spanning 43 cm."""
    spacing = f"{CM_PER_IMAGE * 10.0 / resolution:.6g}"  # mm per pixel
    out = io.StringIO()
    out.write(NIH_HEADER + "\n")
    writer = csv.writer(out, lineterminator="\n")
    for spec in specs:
        writer.writerow([spec.image_id, spec.finding_labels, spec.follow_up, spec.patient_id,
                         spec.age, spec.gender, spec.view, resolution, resolution,
                         spacing, spacing])
    return out.getvalue().encode()


def _fingerprint(specs: Sequence[PhantomSpec], resolution: int) -> str:
    """sha256 of everything that decides the folder's bytes."""
    digest = hashlib.sha256(f"{RENDERER_VERSION}|{resolution}|{PNG_COMPRESS_LEVEL}".encode())
    for spec in specs:
        digest.update(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    return digest.hexdigest()


def is_phantom_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder written (or being written) by :func:`write_phantom_folder`."""
    return (Path(path) / filenames.PHANTOM_MARKER).is_file()


def _check_out(out: Path) -> dict[str, Any] | None:
    """The marker of an existing phantom folder, None for a new or empty one; else an error."""
    if out.exists() and not out.is_dir():
        raise PhantomError(f"--out {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    if not is_phantom_folder(out):
        raise PhantomError(f"--out {out} is not empty and is not a phantom folder (no "
                           f"{filenames.PHANTOM_MARKER}): choose a new or empty folder")
    try:
        return json.loads((out / filenames.PHANTOM_MARKER).read_text())
    except (OSError, ValueError):
        return {}  # unreadable marker: our folder, but rebuild it


def write_phantom_folder(out_dir: str | os.PathLike[str], specs: Sequence[PhantomSpec],
                         resolution: int = 256, workers: int | None = None,
                         config: dict[str, Any] | None = None) -> Path:
    """Render ``specs`` into ``out_dir`` in NIH's layout; returns the folder.

    Order of writing: ``phantom.json`` (the marker, with ``config``), the PNGs (each written
    under a temporary name and renamed), ``Data_Entry_2017.csv`` last and atomically, so a
    folder with a CSV is complete. Rerun on a folder made from the same specs, it renders only
    the missing images; from other specs, it clears the folder's phantoms first. ``workers``
    processes render in parallel (default ``os.cpu_count()``); the bytes do not depend on it.
    """
    if resolution < MIN_RESOLUTION:
        raise PhantomError(f"--resolution must be at least {MIN_RESOLUTION} px, got {resolution}")
    if not specs:
        raise PhantomError("no image to write")
    names = [spec.image_id for spec in specs]
    if len(set(names)) != len(names):
        raise PhantomError("an Image Index appears twice among the specs")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise PhantomError(f"--workers must be at least 1, got {workers}")
    out = Path(out_dir)
    marker = _check_out(out)
    images = out / "images"
    fingerprint = _fingerprint(specs, resolution)
    resume = marker is not None and marker.get("specs_sha256") == fingerprint
    images.mkdir(parents=True, exist_ok=True)
    (out / CSV_NAME).unlink(missing_ok=True)  # from here until the end the folder is incomplete
    for stale in images.iterdir():
        if is_temporary(stale.name) or (not resume and stale.suffix == ".png"):
            stale.unlink()
    if not resume:
        resolve(out / filenames.PHANTOM_MARKER).write_text(json.dumps({
            "format": 1, "source": "phantom", "renderer_version": RENDERER_VERSION,
            "resolution": resolution, "num_images": len(specs), "specs_sha256": fingerprint,
            "config": config or {},
        }, indent=2))

    todo = list(specs)
    if resume:
        todo = [spec for spec in specs if not (images / spec.image_id).is_file()]
    workers = min(workers, max(len(todo), 1))
    if workers == 1:
        _render_chunk(todo, resolution, str(images))
    elif todo:
        # small chunks keep both workers busy to the end; spawn: no inherited threads or locks
        size = max(1, min(64, len(todo) // (4 * workers)))
        chunks = [todo[i: i + size] for i in range(0, len(todo), size)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in pool.map(_render_chunk, chunks, [resolution] * len(chunks),
                              [str(images)] * len(chunks)):
                pass
    resolve(out / CSV_NAME).write_bytes(_csv_bytes(specs, resolution))
    return out


def make_phantom_folder(out_dir: str | os.PathLike[str], config: PhantomConfig,
                        workers: int | None = None) -> tuple[Path, int]:
    """Build ``config``'s specs and write them to ``out_dir``; returns (folder, image count)."""
    specs = config.specs()
    out = write_phantom_folder(out_dir, specs, config.resolution, workers,
                               config=dataclasses.asdict(config))
    return out, len(specs)

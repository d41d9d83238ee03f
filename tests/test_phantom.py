"""Phantom chest X-rays: rendering, signatures that the measurements separate from Normal, the
rule-based classifier at 256/64/32 px, spec sampling, NIH metadata, folders and the job."""

from __future__ import annotations

import csv
import gzip
import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from cxrfactory import labels as L
from cxrfactory.data import phantom as P
from cxrfactory.data import phantom_measure as M
from jobs import make_phantoms

REPO = Path(__file__).resolve().parents[1]
CLASSES = L.DEFAULT_CLASSES
PER_CLASS = 20  # images per class in the measured sets


def _spec(name: str, k: int, offset: int = 0) -> P.PhantomSpec:
    """The k-th test phantom of a class: a third AP, half female, its own patient."""
    return P.PhantomSpec(
        image_id=f"{k:08d}_000.png", patient_id=k, follow_up=0, age=50,
        gender="MF"[k % 2], view="AP" if k % 3 == 0 else "PA",
        findings=() if name == "Normal" else (name,),
        seed=1000 * CLASSES.index(name) + k + offset, patient_seed=k + offset)


def _gan_like(image: np.ndarray, k: int) -> np.ndarray:
    """Blur (0.7 px at 64 px) and noise (sd 8 grey levels), roughly what a small GAN leaves."""
    rng = np.random.default_rng(k)
    blurred = ndimage.gaussian_filter(image.astype(np.float32), 0.7 * image.shape[0] / 64)
    return np.clip(blurred + rng.normal(0.0, 8.0, image.shape), 0, 255)


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, list]]:
    """Per resolution tag, per class: (image, measurements) of PER_CLASS phantoms."""
    sets: dict[str, dict[str, list]] = {}
    for tag, resolution, degrade in (("256", 256, False), ("64-gan", 64, True)):
        sets[tag] = {}
        for name in CLASSES:
            images = [P.render(_spec(name, k), resolution) for k in range(PER_CLASS)]
            if degrade:
                images = [_gan_like(im, k) for k, im in enumerate(images)]
            sets[tag][name] = [(im, M.measure(im)) for im in images]
    return sets


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_render_is_a_pure_function_of_the_spec(resolution):
    spec = _spec("Mass", 3)
    first, again = P.render(spec, resolution), P.render(spec, resolution)
    assert first.shape == (resolution, resolution) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    other = P.render(_spec("Mass", 4), resolution)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 2


def test_render_rejects_tiny_resolution():
    with pytest.raises(ValueError, match="at least 32"):
        P.render(_spec("Normal", 0), 16)


def test_brightness_follows_attenuation():
    """Air < lungs < abdomen (soft tissue) < spine, at fixed points every pose keeps."""
    for k in range(8):
        im = P.render(_spec("Normal", k), 256).astype(float)

        def at(x: float, y: float) -> float:  # median of a 9x9 patch around (x, y)
            r, c = int(y * 256), int(x * 256)
            return float(np.median(im[r - 4: r + 5, c - 4: c + 5]))

        air, lungs = at(0.03, 0.03), min(at(0.3, 0.4), at(0.7, 0.4))
        abdomen, spine = at(0.3, 0.92), at(0.5, 0.25)
        assert air < lungs - 20 < abdomen - 40 < spine - 45, (k, air, lungs, abdomen, spine)


def test_follow_ups_share_the_patients_anatomy():
    """Two follow-ups of one Normal patient differ far less than two patients do."""
    same = [P.PhantomSpec(f"00000001_00{i}.png", 1, i, 50, "M", "PA", seed=10 + i,
                          patient_seed=7) for i in range(2)]
    other = P.PhantomSpec("00000002_000.png", 2, 0, 50, "M", "PA", seed=12, patient_seed=8)
    ctr = [M.measure(P.render(s, 256))["ctr"] for s in (*same, other)]
    assert abs(ctr[0] - ctr[1]) < 0.02
    assert len({round(c, 3) for c in ctr}) > 1


# --------------------------------------------------------------------------------------------
# Signatures: each measurement separates its disease from Normal
# --------------------------------------------------------------------------------------------

def _fraction(values, predicate) -> float:
    return float(np.mean([predicate(v) for v in values]))


# (class, measurement, test for "present", share of the class that must show it)
SIGNATURES = [
    ("Cardiomegaly", "ctr", lambda v: v > 0.5, 0.95),
    ("Effusion", "effusion", lambda v: v > 0.0, 0.95),
    ("Pneumothorax", "pneumothorax", lambda v: v > 0.1, 0.95),
    ("Nodule", "nodule_count", lambda v: v >= 1, 0.9),
    ("Mass", "lesion_cm", lambda v: v > 3.0, 0.95),
    ("Pneumonia", "consolidation_cm2", lambda v: v > 12.0, 0.9),
    ("Infiltration", "infiltration", lambda v: v > 0.08, 0.8),
    ("Atelectasis", "plate_cm", lambda v: v > 3.5, 0.8),
]


@pytest.mark.parametrize("tag", ["256", "64-gan"])
@pytest.mark.parametrize("name,key,present,share", SIGNATURES, ids=[s[0] for s in SIGNATURES])
def test_measurement_separates_disease_from_normal(measured, tag, name, key, present, share):
    sick = [m[key] for _, m in measured[tag][name]]
    normal = [m[key] for _, m in measured[tag]["Normal"]]
    assert _fraction(sick, present) >= share, (name, tag, np.round(sick, 3))
    assert _fraction(normal, present) <= 0.05, ("Normal", tag, np.round(normal, 3))


def test_lesion_sizes_are_in_cm(measured):
    """Nodules measure under 3 cm and masses over, as drawn (2.0-2.8 cm and 4.5-6 cm)."""
    nodules = [m["lesion_cm"] for _, m in measured["256"]["Nodule"] if m["nodule_count"]]
    masses = [m["lesion_cm"] for _, m in measured["256"]["Mass"]]
    assert 1.6 < np.median(nodules) < 3.0 and max(nodules) < 3.0
    assert 4.3 < np.median(masses) < 6.5


def test_ctr_matches_the_drawn_heart():
    """Measured CTR within 0.03 of the ratio the renderer drew (PA view, no magnification)."""
    from cxrfactory.data.phantom_anatomy import apply_findings, patient_chest

    for k in range(6):
        spec = P.PhantomSpec("x.png", k, 0, 50, "M", "PA", ("Cardiomegaly",) if k % 2 else (),
                             seed=k, patient_seed=k)
        drawn = apply_findings(patient_chest(spec), spec,
                               np.random.default_rng([spec.seed, 0x5EED])).ctr
        assert abs(M.measure(P.render(spec, 256))["ctr"] - drawn) < 0.03


# --------------------------------------------------------------------------------------------
# Rule-based classifier
# --------------------------------------------------------------------------------------------

def _accuracy(pairs: dict[str, list], classes=CLASSES) -> tuple[float, dict[str, float]]:
    """Mean and per-class accuracy of the rules on (image, measurements) pairs."""
    per_class = {name: _fraction([m for _, m in pairs[name]],
                                 lambda m, n=name: M.classify(m, classes) == n)
                 for name in classes}
    return float(np.mean(list(per_class.values()))), per_class


@pytest.mark.parametrize("tag,overall,worst", [("256", 0.93, 0.8), ("64-gan", 0.9, 0.75)])
def test_predict_class_accuracy(measured, tag, overall, worst):
    accuracy, per_class = _accuracy(measured[tag])
    assert accuracy >= overall and min(per_class.values()) >= worst, per_class


def test_predict_class_at_32_px_for_heart_fluid_and_air():
    """At 32 px (GAN-like blur and noise) CTR, effusion and pneumothorax still classify."""
    chosen = ("Normal", "Cardiomegaly", "Effusion", "Pneumothorax")
    pairs = {name: [(None, M.measure(_gan_like(P.render(_spec(name, k, 500), 32), k)))
                    for k in range(15)] for name in chosen}
    accuracy, per_class = _accuracy(pairs, chosen)
    assert accuracy >= 0.9 and min(per_class.values()) >= 0.8, per_class


def test_predict_class_restricted_and_bad_classes():
    mass = P.render(_spec("Mass", 1), 128)
    assert M.predict_class(mass) == "Mass"
    assert M.predict_class(mass, ["Normal", "Cardiomegaly"]) in ("Normal", "Cardiomegaly")
    assert M.predict_class(mass, ["Cardiomegaly", "Effusion"]) in ("Cardiomegaly", "Effusion")
    with pytest.raises(L.UnknownClassError, match="choose from"):
        M.predict_class(mass, ["Normal", "Fracture"])


def test_measure_input_handling():
    image = P.render(_spec("Cardiomegaly", 2), 64)
    as_float = M.measure(image.astype(np.float64) / 255.0)  # any brightness scale works
    assert as_float["ctr"] == pytest.approx(M.measure(image)["ctr"], abs=1e-6)
    assert M.measure(image[None]) == M.measure(image[..., None]) == M.measure(image)
    assert all(np.isnan(v) for v in M.measure(np.full((64, 64), 128.0)).values())
    with pytest.raises(ValueError, match="2-D grayscale"):
        M.measure(np.zeros(64))
    with pytest.raises(ValueError, match="NaN"):
        M.measure(np.full((64, 64), np.nan))
    small = M.measure(P.render(_spec("Mass", 1), 32))
    assert np.isnan(small["lesion_cm"]) and np.isfinite(small["ctr"])


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

def test_sample_specs_follow_nih_prevalence_and_patients():
    specs = P.sample_specs(3000, seed=5)
    labels = [s.label for s in specs]
    total = sum(P.NIH_SINGLE_LABEL_COUNTS.values())
    for name in ("Normal", "Infiltration", "Effusion"):
        expected = P.NIH_SINGLE_LABEL_COUNTS[name] / total
        assert abs(labels.count(name) / 3000 - expected) < 0.03, name
    assert all(re.fullmatch(r"\d{8}_\d{3}\.png", s.image_id) for s in specs)
    assert len({s.image_id for s in specs}) == 3000
    assert len({s.seed for s in specs}) == 3000
    patients: dict[int, list[P.PhantomSpec]] = {}
    for s in specs:
        patients.setdefault(s.patient_id, []).append(s)
    assert 1.4 < 3000 / len(patients) < 2.4  # several follow-ups sometimes
    for visits in patients.values():
        assert [v.follow_up for v in visits] == list(range(len(visits)))
        assert len({(v.gender, v.patient_seed) for v in visits}) == 1
        assert all(18 <= v.age <= 95 for v in visits)
    assert {s.view for s in specs} == {"PA", "AP"} and {s.gender for s in specs} == {"M", "F"}
    assert [s.finding_labels for s in specs if s.label == "Normal"][0] == "No Finding"


def test_sample_specs_balanced_restricted_and_reproducible():
    specs = P.sample_specs(31, seed=1, classes=["Effusion", "Normal", "Mass"], balanced=True)
    counts = sorted([s.label for s in specs].count(c) for c in ("Normal", "Effusion", "Mass"))
    assert counts == [10, 10, 11]
    assert specs == P.sample_specs(31, seed=1, classes=["Effusion", "Normal", "Mass"],
                                   balanced=True)
    assert specs != P.sample_specs(31, seed=2, classes=["Effusion", "Normal", "Mass"],
                                   balanced=True)
    with pytest.raises(P.PhantomError, match="positive"):
        P.sample_specs(0)
    with pytest.raises(L.UnknownClassError, match="choose from"):
        P.sample_specs(5, classes=["Hernia"])


def _write_metadata(path: Path, rows: list[list[str]]) -> Path:
    with gzip.open(path, "wt", newline="") as handle:
        handle.write(P.NIH_HEADER + "\n")
        csv.writer(handle).writerows(rows)
    return path


def test_specs_from_metadata_rows_boxes_and_filters(tmp_path):
    rows = [
        ["00000001_000.png", "No Finding", "0", "1", "57", "M", "PA", "2682", "2749", "0.143",
         "0.143"],
        ["00000001_001.png", "Effusion|Mass", "1", "1", "058Y", "M", "AP", "2500", "2048",
         "0.168", "0.168"],
        ["00013118_008.png", "Infiltration", "8", "13118", "40", "F", "PA", "2500", "2048",
         "0.168", "0.168"],
        ["00000002_000.png", "Hernia", "0", "2", "80", "F", "PA", "2500", "2048", "0.171",
         "0.171"],
    ]
    meta = _write_metadata(tmp_path / "meta.csv.gz", rows)
    bbox = tmp_path / "boxes.csv"
    bbox.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                    "00013118_008.png,Infiltrate,225.1,547.0,86.8,79.2\n"
                    "00000001_001.png,Mass,700,300,120,110\n")
    specs = P.specs_from_metadata(meta, bbox)
    assert [s.image_id for s in specs] == [r[0] for r in rows]
    assert specs[1].findings == ("Effusion", "Mass") and specs[1].age == 58
    assert specs[1].view == "AP" and specs[1].follow_up == 1
    assert specs[2].boxes == (P.LesionBox("Infiltration", 225.1, 547.0, 86.8, 79.2),)
    assert specs[0].patient_seed == specs[1].patient_seed != specs[2].patient_seed
    assert [s.image_id for s in P.specs_from_metadata(meta, bbox, num_images=2)] == \
        [r[0] for r in rows[:2]]
    kept = P.specs_from_metadata(meta, bbox, classes=["Normal", "Infiltration"])
    assert [s.image_id for s in kept] == ["00000001_000.png", "00013118_008.png"]
    for spec in specs:  # multi-label and out-of-vocabulary findings render
        assert P.render(spec, 64).shape == (64, 64)


def test_specs_from_the_packaged_nih_metadata():
    specs = P.specs_from_metadata(P.packaged_metadata(), num_images=40)
    with gzip.open(P.packaged_metadata(), "rt") as handle:
        head = list(csv.reader(handle))[1:41]
    assert [s.image_id for s in specs] == [r[0] for r in head]
    assert [s.finding_labels for s in specs] == [r[1] for r in head]
    assert [s.patient_id for s in specs] == [int(r[3]) for r in head]


def test_metadata_errors(tmp_path):
    with pytest.raises(P.PhantomError, match="does not exist"):
        P.specs_from_metadata(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("Image,Labels\nx.png,No Finding\n")
    with pytest.raises(P.PhantomError, match="lacks NIH column"):
        P.specs_from_metadata(bad)



# --------------------------------------------------------------------------------------------
# Folders and the job
# --------------------------------------------------------------------------------------------

def _folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_folder_layout_and_same_bytes_for_any_worker_count(tmp_path):
    specs = P.sample_specs(12, seed=3, balanced=True)
    one = P.write_phantom_folder(tmp_path / "one", specs, 64, workers=1)
    two = P.write_phantom_folder(tmp_path / "two", specs, 64, workers=2)
    files = _folder_bytes(one)
    assert files == _folder_bytes(two)
    assert sorted(files) == sorted(["Data_Entry_2017.csv", "phantom.json"]
                                   + [f"images/{s.image_id}" for s in specs])
    image = Image.open(io.BytesIO(files[f"images/{specs[0].image_id}"]))
    assert image.mode == "L" and image.size == (64, 64)
    assert np.array_equal(np.asarray(image), P.render(specs[0], 64))
    text = files["Data_Entry_2017.csv"].decode()
    assert text.splitlines()[0] == P.NIH_HEADER
    assert text.splitlines()[1].split(",")[:7] == [
        specs[0].image_id, specs[0].finding_labels, str(specs[0].follow_up),
        str(specs[0].patient_id), str(specs[0].age), specs[0].gender, specs[0].view]


def test_folder_csv_reads_like_nihs(tmp_path):
    """pandas sees the same columns in a phantom CSV as in NIH's real file."""
    out = P.write_phantom_folder(tmp_path / "f", P.sample_specs(3, seed=0), 32, workers=1)
    ours = pd.read_csv(out / P.CSV_NAME)
    real = pd.read_csv(P.packaged_metadata(), nrows=3)
    assert list(ours.columns) == list(real.columns)
    assert ours["Image Index"].tolist() == sorted(p.name for p in (out / "images").iterdir())


def test_folder_rerun_completes_and_rebuilds(tmp_path):
    specs = P.sample_specs(6, seed=4)
    out = P.write_phantom_folder(tmp_path / "f", specs, 32, workers=1)
    before = _folder_bytes(out)
    (out / "images" / specs[2].image_id).unlink()
    (out / P.CSV_NAME).unlink()
    (out / "images" / ".leftover.png.123.tmp").write_bytes(b"partial")
    P.write_phantom_folder(out, specs, 32, workers=1)
    assert _folder_bytes(out) == before
    fewer = P.sample_specs(3, seed=9)  # other specs: the old phantoms go
    P.write_phantom_folder(out, fewer, 32, workers=1)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        s.image_id for s in fewer)


def test_folder_refuses_foreign_or_bad_output(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    specs = P.sample_specs(2)
    with pytest.raises(P.PhantomError, match="not a phantom folder"):
        P.write_phantom_folder(foreign, specs, 32)
    with pytest.raises(P.PhantomError, match="at least 32"):
        P.write_phantom_folder(tmp_path / "x", specs, 16)
    with pytest.raises(P.PhantomError, match="twice"):
        P.write_phantom_folder(tmp_path / "y", [specs[0], specs[0]], 32)
    assert (foreign / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv,message", [
    (["--num-images", "0"], "--num-images must be positive"),
    (["--num-images", "3", "--classes", "Normal", "Fracture"], "choose from: Normal, Atelectasis"),
    (["--num-images", "3", "--resolution", "16"], "at least 32 px"),
    (["--metadata", "missing.csv"], "does not exist"),
    (["--metadata", "nih", "--balanced"], "cannot be combined"),
    (["--num-images", "3", "--workers", "0"], "--workers"),
    ([], "--num-images is required"),
    (["--num-images", "3", "--bbox", "b.csv"], "only applies with --metadata"),
])
def test_job_rejects_bad_input(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        make_phantoms.main(["--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err


def test_job_cli_smoke_and_foreign_output(tmp_path):
    run = [sys.executable, str(REPO / "jobs" / "make_phantoms.py")]
    done = subprocess.run([*run, "--out", str(tmp_path / "smoke"), "--smoke", "--workers", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "smoke" / P.CSV_NAME)
    assert len(table) == make_phantoms.SMOKE_IMAGES
    assert set(table["Finding Labels"]) == {"No Finding", *L.DISEASES}
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "a.txt").write_text("x")
    failed = subprocess.run([*run, "--out", str(tmp_path / "foreign"), "--num-images", "2"],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0
    assert "error: " in failed.stderr and "Traceback" not in failed.stderr


def test_job_metadata_mode(tmp_path):
    assert make_phantoms.main(["--out", str(tmp_path / "m"), "--metadata", "nih",
                               "--num-images", "5", "--resolution", "32", "--workers", "1"]) == 0
    table = pd.read_csv(tmp_path / "m" / P.CSV_NAME)
    assert table["Image Index"].tolist() == [
        "00000001_000.png", "00000001_001.png", "00000001_002.png", "00000002_000.png",
        "00000003_001.png"]


def test_min_per_class_keeps_nih_skew_but_fills_rare_classes():
    from collections import Counter

    from cxrfactory.data.phantom import PhantomError, sample_specs

    specs = sample_specs(400, seed=3, min_per_class=10)
    counts = Counter(s.label for s in specs)
    assert len(specs) == 400 and min(counts.values()) >= 10 and len(counts) == 9
    assert counts["Normal"] > 150 > counts["Pneumonia"]  # NIH's skew survives
    with pytest.raises(PhantomError):
        sample_specs(50, min_per_class=10)

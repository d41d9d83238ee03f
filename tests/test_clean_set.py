"""A clean synthetic set: synthesize --exclude-flagged AUDIT_DIR leaves out what a memorization
audit flagged and makes replacements from further seeds.

The audit folders (``audit.json`` + ``flagged.parquet``, as ``jobs/audit.py`` writes them) are
written by hand here, flagging chosen image indices, so every expectation is known exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrfactory import filenames
from tests.shard_helpers import save_tiny_generator
from cxrfactory import shards
from cxrfactory.gan.artifact import load_generator_artifact
from cxrfactory.images import decode_png
from cxrfactory.runtime import run_job
from cxrfactory.storage import resolve
from cxrfactory.synthesis import (
    SynthesisError, exclude_images, image_seed, load_exclusions, plan_classes, plan_work,
    regenerate, synthetic_image_id,
)

CLASSES = ("Normal", "Effusion", "Mass")
N = 6  # images per class
R = 4  # rows per file: 2 files per class


def _job():
    import jobs.synthesize as job

    return job


def _id(label: str, i: int, seed: int = 0) -> str:
    """The image id of image ``i`` of ``label`` in a run of ``seed``."""
    return synthetic_image_id(label, image_seed(seed, CLASSES.index(label), i))


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory) -> Path:
    """A tiny generator (16 px), weights scaled up so images of different seeds differ."""
    path = tmp_path_factory.mktemp("gen") / "generator"
    save_tiny_generator(path, CLASSES, ngf=8, z_dim=8)
    return path


def _argv(generator_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--generator", str(generator_dir), "--target-per-class", str(N), "--out", str(out),
            "--rows-per-file", str(R), "--batch-size", "3", *extra]


@pytest.fixture(scope="module")
def base(ray_session, generator_dir, tmp_path_factory) -> Path:
    """The set that is audited: images 0..N-1 of every class."""
    out = tmp_path_factory.mktemp("base") / "synth"
    assert _job().main(_argv(generator_dir, out)) == 0
    return out


def _manifest_sha(root: Path) -> str:
    return hashlib.sha256((root / filenames.MANIFEST).read_bytes()).hexdigest()


def _write_audit(folder: Path, audited: Path, ids: list[str], **override) -> Path:
    """An audit folder as jobs/audit.py writes it, flagging the image ids ``ids``."""
    folder.mkdir(parents=True)
    labels = [image_id.split("-")[1] for image_id in ids]
    summary = {
        "format": 1, "created": "2025-01-01T00:00:00+00:00",
        "synthetic": {"uri": str(audited), "manifest_sha256": _manifest_sha(audited),
                      "n": {c: N for c in CLASSES}},
        "real": {"uri": "/data/real", "split": "train", "manifest_sha256": "0" * 64},
        "held_out": {"uri": "/data/real", "split": "test"},
        "classifier": {"path": "/classifiers/densenet/classifier", "sha256": "1" * 64},
        "rule": {"percentile": 1.0, "spaces": ["feature", "pixel"],
                 "description": "closer than the 1st percentile of held-out distances in both spaces"},
        "thresholds": {"feature": 0.25, "pixel": 11.5},
        "flagged": dict(Counter(labels)), "flag_rate": {c: n / N for c, n in Counter(labels).items()},
        "held_out_flag_rate": 0.01,
        **override,
    }
    (folder / filenames.AUDIT).write_text(json.dumps(summary))
    n = len(ids)
    pq.write_table(pa.table({
        "image_id": pa.array(ids, pa.string()), "label": pa.array(labels, pa.string()),
        "nearest_real_id": pa.array([f"{i:08d}_000.png" for i in range(n)], pa.string()),
        "feature_distance": pa.array([0.1] * n, pa.float64()),
        "pixel_distance": pa.array([5.0] * n, pa.float64()),
    }), folder / filenames.FLAGGED)
    return folder


def _rows(root: Path) -> list[dict]:
    files = sorted(p for p in root.glob("train/*/*.parquet") if not p.name.startswith("."))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def _ids(root: Path, label: str | None = None) -> list[str]:
    return [r["image_id"] for r in _rows(root) if label is None or r["label"] == label]


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.glob("train/*/*.parquet")) if not p.name.startswith(".")}


# ---------------------------------------------------------------------------------------------
# The plan (no Ray)


def test_plan_skips_excluded_indices_and_takes_the_next_ones():
    plan = plan_classes(["Normal", "Mass"], CLASSES, 6)
    excluded = {_id("Mass", 0), _id("Mass", 3), _id("Mass", 5), _id("Mass", 9), _id("Normal", 40)}
    clean = exclude_images(plan, 0, excluded)
    assert [(p.label, p.to_generate, p.skip, p.replaced) for p in clean] == [
        ("Normal", 6, (), 0), ("Mass", 6, (0, 3, 5), 3)]  # index 9 lies beyond the class's range
    items = plan_work(clean, rows_per_file=4)
    assert [(i.path, i.start, i.stop, i.skip, i.rows) for i in items] == [
        ("train/Normal/part-00000.parquet", 0, 4, (), 4),
        ("train/Normal/part-00001.parquet", 4, 6, (), 2),
        ("train/Mass/part-00000.parquet", 1, 7, (3, 5), 4),
        ("train/Mass/part-00001.parquet", 7, 9, (), 2)]
    # Nothing excluded: the very plan of a run without exclusions.
    assert exclude_images(plan, 0, set()) == plan
    assert plan_work(exclude_images(plan, 0, {_id("Normal", 99)}), 4) == plan_work(plan, 4)


# ---------------------------------------------------------------------------------------------
# End to end


def test_clean_set_has_exact_counts_replacements_from_next_seeds_and_an_audit_record(
        base, generator_dir, tmp_path):
    flagged = [_id("Mass", 1), _id("Mass", 4), _id("Normal", 0), _id("Effusion", 2)]
    audit = _write_audit(tmp_path / "audit", base, flagged)
    out = tmp_path / "clean"
    # Effusion is not made: its flag is ignored.
    assert _job().main(_argv(generator_dir, out, "--classes", "Normal", "Mass",
                             "--exclude-flagged", str(audit))) == 0

    manifest = shards.read_manifest(resolve(out))
    assert manifest.counts == {"synthetic": {"Normal": N, "Mass": N}}
    assert _ids(out, "Mass") == [_id("Mass", i) for i in (0, 2, 3, 5, 6, 7)]
    assert _ids(out, "Normal") == [_id("Normal", i) for i in (1, 2, 3, 4, 5, 6)]
    assert not set(flagged) & set(_ids(out))
    # The rows the two sets share are the same images.
    base_rows = {r["image_id"]: r for r in _rows(base)}
    artifact = load_generator_artifact(str(generator_dir))
    for row in _rows(out):
        image = decode_png(row["image"]["bytes"]).astype(int)
        if row["image_id"] in base_rows:
            assert np.abs(image - decode_png(base_rows[row["image_id"]]["image"]["bytes"])).max() <= 1
        else:  # a replacement: remade from its seed alone
            np.testing.assert_array_equal(regenerate(row, artifact), image)
    assert manifest.extra["audit"] == {
        "audits": [{"uri": str(audit), "rule": json.loads((audit / filenames.AUDIT).read_text())["rule"],
                    "thresholds": {"feature": 0.25, "pixel": 11.5}, "flagged_total": 4}],
        "excluded": sorted(flagged[:3]),
        "replaced": {"Normal": 1, "Mass": 2}}
    assert manifest.config["exclude_flagged"] == [str(audit)]
    assert "3 flagged image(s) excluded, 3 replaced" in (out / filenames.CARD).read_text()

    # Determinism: the same command elsewhere, with two workers, writes the same bytes.
    again = tmp_path / "again"
    assert _job().main(_argv(generator_dir, again, "--classes", "Normal", "Mass", "--workers", "2",
                             "--exclude-flagged", str(audit))) == 0
    assert _file_bytes(again) == _file_bytes(out)
    # ... and the same command again finds its output complete.
    assert _job().main(_argv(generator_dir, again, "--classes", "Normal", "Mass",
                             "--exclude-flagged", str(audit))) == 0
    assert _file_bytes(again) == _file_bytes(out)

    # A second round: audit the clean set, exclude its flags; what was excluded before stays out.
    audit2 = _write_audit(tmp_path / "audit2", out, [_id("Mass", 6)])
    out2 = tmp_path / "clean2"
    assert _job().main(_argv(generator_dir, out2, "--classes", "Normal", "Mass",
                             "--exclude-flagged", str(audit2))) == 0
    assert _ids(out2, "Mass") == [_id("Mass", i) for i in (0, 2, 3, 5, 7, 8)]
    assert _ids(out2, "Normal") == [_id("Normal", i) for i in (1, 2, 3, 4, 5, 6)]
    record = shards.read_manifest(resolve(out2)).extra["audit"]
    assert record["excluded"] == sorted([*flagged[:3], _id("Mass", 6)])
    assert record["replaced"] == {"Normal": 1, "Mass": 3}


def test_a_run_with_exclusions_is_another_run_than_one_without(base, generator_dir, tmp_path, capsys):
    audit = _write_audit(tmp_path / "audit", base, [_id("Mass", 1)])
    err = _fail(_argv(generator_dir, base, "--exclude-flagged", str(audit)), capsys)
    assert "already holds a finished dataset made with other settings" in err
    assert "excluded" in err


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, exit status 2, nothing written (no Ray needed)


def _fail(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        run_job(_job().main, argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def _fake_set(root: Path, generator_dir: Path, *, seed: int = 0, generator: str | None = None) -> Path:
    """The manifest of a finished synthetic set (no shards: an audit reads only the manifest)."""
    sha = generator or (generator_dir / filenames.SHA256).read_text().strip()
    root.mkdir(parents=True)
    shards.write_manifest(resolve(root), shards.Manifest(
        source="synthetic", classes=list(CLASSES), counts={"synthetic": {c: N for c in CLASSES}},
        files=[], extra={"generator": sha, "seed": seed,
                         "plan": [{"class": c, "real": 0, "to_generate": N} for c in CLASSES]}))
    return root


def test_missing_or_corrupt_audit_files_are_clear_errors(generator_dir, tmp_path, capsys):
    audited = _fake_set(tmp_path / "set", generator_dir)
    out = tmp_path / "out"

    def fail(audit: Path) -> str:
        return _fail(_argv(generator_dir, out, "--exclude-flagged", str(audit)), capsys)

    assert "does not exist" in fail(tmp_path / "nowhere")
    audit = _write_audit(tmp_path / "a", audited, [_id("Mass", 1)])
    (audit / filenames.AUDIT).unlink()
    err = fail(audit)
    assert f"{audit / filenames.AUDIT} is missing" in err and "run jobs/audit.py" in err

    audit = _write_audit(tmp_path / "b", audited, [_id("Mass", 1)])
    (audit / filenames.AUDIT).write_text('{"format": 1, "synthetic": ')
    assert "cannot be read as JSON" in fail(audit)
    (audit / filenames.AUDIT).write_text('{"format": 1, "synthetic": {"uri": "x"}}')
    assert "has no valid 'rule'" in fail(audit)
    audit = _write_audit(tmp_path / "b2", audited, [_id("Mass", 1)], synthetic={"uri": str(audited)})
    assert "has no valid 'synthetic.manifest_sha256'" in fail(audit)
    audit = _write_audit(tmp_path / "b3", audited, [_id("Mass", 1)], format=2)
    assert "audit format 2" in fail(audit)

    audit = _write_audit(tmp_path / "c", audited, [_id("Mass", 1)])
    (audit / filenames.FLAGGED).unlink()
    err = fail(audit)
    assert f"{audit / filenames.FLAGGED} is missing" in err and "run jobs/audit.py" in err
    (audit / filenames.FLAGGED).write_bytes(b"PAR1 not really")
    assert "cannot be read as Parquet" in fail(audit)

    audit = _write_audit(tmp_path / "d", audited, [_id("Mass", 1)], flagged={"Mass": 2})
    assert "holds 1 row(s) where audit.json counts 2" in fail(audit)
    assert not out.exists()


def test_an_audit_of_another_generator_seed_or_set_is_refused(generator_dir, tmp_path, capsys):
    out = tmp_path / "out"

    def fail(audit: Path, *extra: str) -> str:
        return _fail(_argv(generator_dir, out, "--exclude-flagged", str(audit), *extra), capsys)

    other = _fake_set(tmp_path / "other-gen", generator_dir, generator="f" * 64)
    err = fail(_write_audit(tmp_path / "a", other, [_id("Mass", 1)]))
    assert "was made by generator ffffffffffff" in err and "flags name other images" in err

    seed1 = _fake_set(tmp_path / "seed1", generator_dir, seed=1)
    audit = _write_audit(tmp_path / "b", seed1, [_id("Mass", 1, seed=1)])
    assert "was made with --seed 1, this run has --seed 0" in fail(audit)
    # For a run of seed 1 the seed matches; a flag must then name an image of the set, and
    # image 1 of seed 0 is not one.
    audit = _write_audit(tmp_path / "c", seed1, [_id("Mass", 1, seed=0)])
    with pytest.raises(SynthesisError, match="not an image of the audited set"):
        load_exclusions([str(audit)], classes=CLASSES, vocabulary=CLASSES,
                        generator_sha256=(generator_dir / filenames.SHA256).read_text().strip(), seed=1)

    audited = _fake_set(tmp_path / "set", generator_dir)
    beyond = _write_audit(tmp_path / "d", audited, [_id("Mass", N)])  # the set holds 0..N-1
    assert "not an image of the audited set" in fail(beyond)
    assert "not a synthetic image id" in fail(_write_audit(tmp_path / "e", audited, ["syn-Mass-x12"]))
    audit = _write_audit(tmp_path / "f", audited, [_id("Mass", 1)])
    (audited / filenames.MANIFEST).write_text((audited / filenames.MANIFEST).read_text() + "\n")
    assert "has changed since it was audited" in fail(audit)
    assert not out.exists()

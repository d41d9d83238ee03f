"""NIH ingest: real NIH metadata rows with phantom images, counts checked against pandas."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from cxrfactory import filenames
from cxrfactory import labels as L
from cxrfactory import shards
from cxrfactory.images import decode_png
from cxrfactory.data import nih
from cxrfactory.storage import resolve

REPO = Path(__file__).resolve().parents[1]
METADATA = REPO / "cxrfactory" / "data" / "nih_metadata" / "Data_Entry_2017_v2020.csv.gz"
NUM_ROWS = 400
RES = 32


@pytest.fixture(scope="module")
def nih_folder(tmp_path_factory) -> Path:
    """The first NUM_ROWS rows of NIH's real metadata, each rendered as a 32 px phantom."""
    import jobs.make_phantoms as make_phantoms

    out = tmp_path_factory.mktemp("nih")
    make_phantoms.main(["--out", str(out), "--num-images", str(NUM_ROWS), "--resolution", str(RES),
                        "--metadata", str(METADATA), "--workers", "1"])
    return out


def expected_counts(csv: Path) -> pd.Series:
    """What the ingest must keep, computed independently with pandas: single-label rows."""
    df = pd.read_csv(csv)
    labels = df["Finding Labels"]
    single = ~labels.str.contains("|", regex=False)
    names = labels[single].replace({"No Finding": "Normal"})
    return names[names.isin(L.DEFAULT_CLASSES)].value_counts()


def read_all(root: Path) -> pd.DataFrame:
    files = sorted(str(p) for p in root.rglob("*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def test_counts_match_pandas_and_patients_never_straddle_splits(ray_session, nih_folder, tmp_path):
    out = tmp_path / "shards"
    manifest = nih.ingest(nih.IngestConfig(nih_root=str(nih_folder), out=str(out),
                                           resolution=RES, rows_per_file=25), log=lambda s: None)
    expected = expected_counts(nih_folder / "Data_Entry_2017.csv")
    got = pd.Series(manifest.class_counts())
    assert got[got > 0].sort_index().to_dict() == expected.sort_index().to_dict()
    assert manifest.source == "phantom" and not manifest.skipped

    rows = read_all(out)
    assert len(rows) == expected.sum() and rows["image_id"].is_unique
    assert rows.groupby("patient_id")["split"].nunique().max() == 1
    assert set(rows["split"]) <= set(shards.SPLITS)
    # The written image decodes to the requested size.
    img = decode_png(rows["image"].iloc[0]["bytes"])
    assert img.shape == (RES, RES) and img.dtype == np.uint8
    assert (rows["height"] == RES).all() and (rows["width"] == RES).all()
    # Every file holds only the split and class its path names.
    for f in manifest.files:
        table = pq.read_table(out / f, columns=["label", "split"])
        assert {(r["split"], r["label"]) for r in table.to_pylist()} == {
            (shards.shard_folder(f), shards.shard_class(f))}


def test_resize_on_ingest_is_antialiased_to_the_requested_size(ray_session, nih_folder, tmp_path):
    out = tmp_path / "small"
    nih.ingest(nih.IngestConfig(nih_root=str(nih_folder), out=str(out), resolution=16,
                                classes=("Normal", "Effusion")), log=lambda s: None)
    rows = read_all(out)
    assert set(rows["label"]) == {"Normal", "Effusion"}
    assert decode_png(rows["image"].iloc[0]["bytes"]).shape == (16, 16)


def test_corrupt_and_missing_images_are_skipped_and_listed(ray_session, nih_folder, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(nih_folder, folder)
    df = pd.read_csv(folder / "Data_Entry_2017.csv")
    kept = df[df["Finding Labels"] == "No Finding"]["Image Index"].tolist()
    (folder / "images" / kept[0]).write_bytes(b"not a png")
    (folder / "images" / kept[1]).unlink()
    truncated = folder / "images" / kept[2]
    truncated.write_bytes(truncated.read_bytes()[:60])

    out = tmp_path / "shards"
    manifest = nih.ingest(nih.IngestConfig(nih_root=str(folder), out=str(out), resolution=RES),
                          log=lambda s: None)
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest.skipped}
    assert reasons[kept[1]] == "missing"
    assert reasons[kept[0]].startswith("unreadable") and reasons[kept[2]].startswith("unreadable")
    assert manifest.class_counts()["Normal"] == len(kept) - 3
    assert not set(kept[:3]) & set(read_all(out)["image_id"])


def test_rerun_completes_a_partial_output_and_refuses_different_settings(ray_session, nih_folder, tmp_path):
    out = tmp_path / "shards"
    config = nih.IngestConfig(nih_root=str(nih_folder), out=str(out), resolution=RES, rows_per_file=20)
    first = nih.ingest(config, log=lambda s: None)
    # Simulate a stop part way: the manifest and two shards are gone.
    (out / filenames.MANIFEST).unlink()
    for f in first.files[:2]:
        (out / f).unlink()
    second = nih.ingest(config, log=lambda s: None)
    assert second.counts == first.counts and second.files == first.files
    assert len(read_all(out)) == first.total()
    with pytest.raises(shards.OutputConflictError, match="--overwrite"):
        nih.ingest(nih.IngestConfig(nih_root=str(nih_folder), out=str(out), resolution=16),
                   log=lambda s: None)
    redone = nih.ingest(nih.IngestConfig(nih_root=str(nih_folder), out=str(out), resolution=16,
                                         overwrite=True), log=lambda s: None)
    assert redone.total() == first.total()


def test_ingest_to_s3(ray_session, nih_folder, s3_bucket, s3_endpoint):
    uri = f"{s3_bucket}/real"
    manifest = nih.ingest(nih.IngestConfig(nih_root=str(nih_folder), out=uri, resolution=RES,
                                           classes=("Normal", "Infiltration"), s3_endpoint=s3_endpoint),
                          log=lambda s: None)
    root = resolve(uri, s3_endpoint)
    back = shards.read_manifest(root)
    assert back.counts == manifest.counts
    table = shards.read_shard(root.join(manifest.files[0]))
    assert decode_png(table["image"][0]["bytes"].as_py()).shape == (RES, RES)


def test_official_split_lists_are_used_when_present(ray_session, nih_folder, tmp_path):
    folder = tmp_path / "official"
    shutil.copytree(nih_folder, folder)
    df = pd.read_csv(folder / "Data_Entry_2017.csv")
    test_patients = set(df["Patient ID"].unique()[::4])
    is_test = df["Patient ID"].isin(test_patients)
    (folder / "test_list.txt").write_text("\n".join(df.loc[is_test, "Image Index"]) + "\n")
    (folder / "train_val_list.txt").write_text("\n".join(df.loc[~is_test, "Image Index"]) + "\n")
    out = tmp_path / "shards"
    nih.ingest(nih.IngestConfig(nih_root=str(folder), out=str(out), resolution=RES), log=lambda s: None)
    rows = read_all(out)
    assert set(rows.loc[rows["split"] == "test", "patient_id"]) == test_patients & set(rows["patient_id"])


@pytest.mark.parametrize("argv, message", [
    (["--nih-root", "/nonexistent/nih", "--out", "x"], "is not a folder"),
    (["--nih-root", "{empty}", "--out", "x"], "Data_Entry_2017"),
    (["--nih-root", "{folder}", "--out", "x", "--classes", "Hernia"], "choose from: Normal"),
    (["--nih-root", "{folder}", "--out", "x", "--rows-per-file", "0"], "rows-per-file"),
])
def test_bad_input_exits_with_a_clear_message(argv, message, nih_folder, tmp_path, capsys):
    import jobs.ingest_nih as job
    from cxrfactory.runtime import run_job

    (tmp_path / "empty").mkdir()
    argv = [a.format(empty=tmp_path / "empty", folder=nih_folder) for a in argv]
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        run_job(job.main, argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_columns_are_named(tmp_path):
    (tmp_path / "images").mkdir()
    pd.DataFrame({"Image Index": ["a.png"], "Labels": ["Mass"]}).to_csv(
        tmp_path / "Data_Entry_2017.csv", index=False)
    with pytest.raises(nih.IngestError, match=r"Finding Labels"):
        nih.read_metadata(nih.find_metadata_csv(tmp_path))

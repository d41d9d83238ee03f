"""The product opens in other people's tools: every reader's defaults, local and on S3.

A small ingest output and a small synthetic set are written by the project's own jobs, then
read by pandas, pyarrow, Polars, DuckDB, Hugging Face ``datasets``, Ray Data and the project's
readers. Each must give one row per image with the ``label`` that the files, read one by one,
hold, and decode to the same pixels.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from cxrfactory.dataset_card import finish_set
from cxrfactory import filenames
from cxrfactory import shards
from cxrfactory.images import decode_png
from cxrfactory.shard_dataset import ShardDataset
from cxrfactory.storage import resolve
from tests.test_synthesis import generator_dir  # noqa: F401  (the tiny generator fixture)

REPO = Path(__file__).resolve().parents[1]
METADATA = REPO / "cxrfactory" / "data" / "nih_metadata" / "Data_Entry_2017_v2020.csv.gz"
CLASSES = ("Normal", "Effusion", "Mass")


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path):
    """Hugging Face ``datasets`` must not try the Hub, and caches in the test's folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture(scope="module")
def nih_folder(tmp_path_factory) -> Path:
    import jobs.make_phantoms as make_phantoms

    out = tmp_path_factory.mktemp("nih")
    make_phantoms.main(["--out", str(out), "--num-images", "150", "--resolution", "32",
                        "--metadata", str(METADATA), "--workers", "1"])
    return out


def _ingest(nih_folder: Path, out: str, endpoint: str | None) -> str:
    import jobs.ingest_nih as job

    argv = ["--nih-root", str(nih_folder), "--out", out, "--resolution", "16", "--rows-per-file", "20"]
    assert job.main(argv + (["--s3-endpoint", endpoint] if endpoint else [])) == 0
    return out


def _synthesize(generator_dir: Path, out: str, endpoint: str | None) -> str:
    import jobs.synthesize as job

    argv = ["--generator", str(generator_dir), "--target-per-class", "7", "--out", out,
            "--rows-per-file", "3", "--batch-size", "4"]
    assert job.main(argv + (["--s3-endpoint", endpoint] if endpoint else [])) == 0
    return out


@pytest.fixture(scope="module")
def local_sets(ray_session, nih_folder, generator_dir, tmp_path_factory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("sets")
    return {"real": _ingest(nih_folder, str(base / "real"), None),
            "synthetic": _synthesize(generator_dir, str(base / "synthetic"), None)}


@pytest.fixture(scope="module")
def s3_sets(ray_session, nih_folder, generator_dir, s3_endpoint) -> dict[str, str]:
    import uuid

    import boto3

    bucket = f"readers-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"real": _ingest(nih_folder, f"s3://{bucket}/real", s3_endpoint),
            "synthetic": _synthesize(generator_dir, f"s3://{bucket}/synthetic", s3_endpoint)}


# ---------------------------------------------------------------------------------------------
# The readers, each as its documentation shows it; on S3 each is given the endpoint its own way.


def _pyarrow_fs(endpoint: str | None):
    import pyarrow.fs as pafs

    if endpoint is None:
        return None
    return pafs.S3FileSystem(endpoint_override=endpoint.removeprefix("http://"), scheme="http",
                             region="us-east-1")


def _bare(root: str, endpoint: str | None) -> str:
    """A path for a pyarrow filesystem: ``s3://b/p`` -> ``b/p`` when one is given."""
    return root.removeprefix("s3://") if endpoint else root


def read_pandas(root, endpoint):
    if endpoint is None:
        return pd.read_parquet(root)
    return pd.read_parquet(root, storage_options={"endpoint_url": endpoint})


def read_pyarrow_dataset(root, endpoint):
    import pyarrow.dataset as ds

    return ds.dataset(_bare(root, endpoint), format="parquet", partitioning="hive",
                      filesystem=_pyarrow_fs(endpoint)).to_table().to_pandas()


def read_pyarrow_table(root, endpoint):
    return pq.read_table(_bare(root, endpoint), filesystem=_pyarrow_fs(endpoint)).to_pandas()


def read_polars(root, endpoint):
    import polars as pl

    options = None if endpoint is None else {
        "aws_endpoint_url": endpoint, "aws_allow_http": "true", "aws_region": "us-east-1"}
    frame = pl.scan_parquet(f"{root}/**/*.parquet", storage_options=options).collect()
    return frame.to_pandas()


def read_duckdb(root, endpoint):
    import duckdb

    con = duckdb.connect()
    if endpoint is not None:  # fsspec's S3 (DuckDB's own httpfs is an extension it downloads)
        import s3fs

        con.register_filesystem(s3fs.S3FileSystem(endpoint_url=endpoint))
    return con.sql(f"SELECT * FROM read_parquet('{root}/**/*.parquet', "
                   "hive_partitioning = true)").df()


def _hf_frame(dataset_dict) -> pd.DataFrame:
    frames = []
    for split in dataset_dict.values():
        assert type(split.features["image"]).__name__ == "Image"  # decodes without a cast
        frame = split.remove_columns("image").to_pandas()
        frame["image"] = [image for image in split["image"]]  # PIL images
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def read_hf_parquet(root, endpoint):
    import datasets

    if endpoint is None:
        return _hf_frame(datasets.load_dataset("parquet", data_dir=root))
    # data_dir is a local folder to datasets; remote files are named by fsspec URLs. Its
    # offline mode (set for these tests) refuses any remote URL, the loopback S3 included.
    with mock.patch.object(datasets.config, "HF_HUB_OFFLINE", False):
        return _hf_frame(datasets.load_dataset("parquet", data_files=f"{root}/**/*.parquet",
                                               storage_options={"endpoint_url": endpoint}))


def read_hf_folder(root, endpoint):
    import datasets

    assert endpoint is None  # load_dataset(path) takes a local folder or a Hub id
    return _hf_frame(datasets.load_dataset(root))


def read_ray(root, endpoint):
    import ray

    return ray.data.read_parquet(_bare(root, endpoint), filesystem=_pyarrow_fs(endpoint)).to_pandas()


def read_project_ray(root, endpoint):
    from cxrfactory.raydata import read_shards

    return read_shards(root, s3_endpoint=endpoint)[0].to_pandas()


def read_shard_dataset(root, endpoint):
    dataset = ShardDataset(root, s3_endpoint=endpoint)
    images = [dataset[i][0] for i in range(len(dataset))]  # (1, H, W) float tensors in [0, 1]
    return pd.DataFrame({"image_id": dataset.image_ids,
                         "label": [dataset.classes[i] for i in dataset.labels],
                         "image": [(t[0].numpy() * 255).round().astype(np.uint8) for t in images]})


READERS = {
    "pandas": read_pandas, "pyarrow.dataset": read_pyarrow_dataset, "pyarrow.parquet": read_pyarrow_table,
    "polars": read_polars, "duckdb": read_duckdb, "datasets(parquet)": read_hf_parquet,
    "datasets(folder)": read_hf_folder, "ray.data": read_ray, "read_shards": read_project_ray,
    "ShardDataset": read_shard_dataset,
}


def _pixels(image) -> np.ndarray:
    """One reader's image cell -> uint8 (H, W): HF gives PIL, the rest the struct or bytes."""
    if isinstance(image, Image.Image):
        return np.asarray(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 2:
        return image
    data = image["bytes"] if isinstance(image, dict) else image
    return decode_png(bytes(data))


def expected_rows(root: str, endpoint: str | None) -> dict[str, tuple[str, np.ndarray]]:
    """``image_id -> (label, pixels)`` from the manifest's files, read one by one."""
    loc = resolve(root, endpoint)
    out = {}
    for rel in shards.read_manifest(loc).files:
        table = shards.read_shard(loc.join(rel), columns=["image_id", "label", "image"])
        for row in table.to_pylist():
            out[row["image_id"]] = (row["label"], decode_png(row["image"]["bytes"]))
    return out


def check_reader(name: str, root: str, endpoint: str | None) -> None:
    expected = expected_rows(root, endpoint)
    manifest = shards.read_manifest(resolve(root, endpoint))
    assert len(expected) == manifest.total()
    frame = READERS[name](root, endpoint)
    assert list(frame.columns).count("label") == 1, f"{name}: columns {list(frame.columns)}"
    assert len(frame) == manifest.total(), f"{name}: {len(frame)} rows"
    labels = dict(zip(frame["image_id"], frame["label"].astype(str)))
    assert labels == {k: v[0] for k, v in expected.items()}, name
    counts = collections.Counter(labels.values())
    assert {c: n for c, n in manifest.class_counts().items() if n} == dict(counts)
    # One image per class decodes to the pixels the file holds.
    for label in counts:
        row = frame[frame["label"].astype(str) == label].iloc[0]
        np.testing.assert_array_equal(_pixels(row["image"]), expected[row["image_id"]][1])


@pytest.mark.parametrize("kind", ["real", "synthetic"])
@pytest.mark.parametrize("name", list(READERS))
def test_every_reader_opens_a_local_shard_folder(name, kind, local_sets):
    check_reader(name, local_sets[kind], None)


@pytest.mark.parametrize("kind", ["real", "synthetic"])
@pytest.mark.parametrize("name", [n for n in READERS if n != "datasets(folder)"])
def test_every_reader_opens_a_shard_folder_on_s3(name, kind, s3_sets, s3_endpoint):
    check_reader(name, s3_sets[kind], s3_endpoint)


# ---------------------------------------------------------------------------------------------
# The dataset card


def test_dataset_card_states_the_set_and_is_a_hub_card(local_sets, tmp_path):
    import datasets

    synthetic = Path(local_sets["synthetic"])
    manifest = shards.read_manifest(resolve(synthetic))
    text = (synthetic / filenames.CARD).read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert manifest.extra["generator"] in text and "jobs/synthesize.py --generator" in text
    assert "| Mass | 7 | 7 |" in text and "NIH" in text
    assert header["dataset_info"]["splits"] == [{"name": "train", "num_examples": 21}]
    # As README.md (the Hub's name for it), datasets takes its configs and features.
    hub = tmp_path / "hub"
    shutil.copytree(synthetic, hub)
    (hub / filenames.CARD).rename(hub / "README.md")
    loaded = datasets.load_dataset(str(hub))
    assert loaded["train"].num_rows == 21
    assert type(loaded["train"].features["image"]).__name__ == "Image"

    real = Path(local_sets["real"])
    card = (real / filenames.CARD).read_text()
    real_manifest = shards.read_manifest(resolve(real))
    header = yaml.safe_load(card.split("---\n")[1])
    splits = {s["name"]: s["num_examples"] for s in header["dataset_info"]["splits"]}
    assert splits == {{"val": "validation"}.get(s, s): real_manifest.total(s)
                      for s in real_manifest.counts}
    hub = tmp_path / "hub-real"
    shutil.copytree(real, hub)
    (hub / filenames.CARD).rename(hub / "README.md")
    loaded = datasets.load_dataset(str(hub))
    assert {k: v.num_rows for k, v in loaded.items()} == splits


# ---------------------------------------------------------------------------------------------
# A writer stopped part way


def test_a_stopped_writer_leaves_nothing_a_plain_reader_takes_for_data(local_sets, tmp_path):
    out = tmp_path / "stopped"
    shutil.copytree(local_sets["synthetic"], out)
    (out / filenames.MANIFEST).unlink()
    (out / filenames.CARD).unlink()
    # One file never written, another cut short by a killed writer (its temporary name kept).
    files = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    gone, cut = out / files[0], out / files[1]
    gone.unlink()
    data = cut.read_bytes()
    cut.unlink()
    from cxrfactory.storage import temporary_name

    (cut.parent / temporary_name(cut.name)).write_bytes(data[: len(data) // 2])
    whole = set()
    for p in out.rglob("*.parquet"):
        if not p.name.startswith("."):
            whole |= set(pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist())
    for name in ("pandas", "pyarrow.dataset", "pyarrow.parquet", "polars", "duckdb",
                 "datasets(parquet)", "ray.data"):
        assert set(READERS[name](str(out), None)["image_id"]) == whole, name
    with pytest.raises(shards.ManifestError, match="did not finish"):
        ShardDataset(str(out))


# ---------------------------------------------------------------------------------------------
# Folders of format 1


def _downgrade_to_format_1(root: Path) -> None:
    """Rewrite a format-2 folder as cxrfactory 0.1 wrote it: label=<Class>/ files mixing
    splits, ``manifest.json``, no card."""
    manifest = shards.read_manifest(resolve(root))
    by_class: dict[str, list] = {}
    for rel in manifest.files:
        by_class.setdefault(shards.shard_class(rel), []).append(pq.read_table(root / rel))
        (root / rel).unlink()
    files = []
    for label, tables in by_class.items():
        import pyarrow as pa

        table = pa.concat_tables(tables)
        for k, start in enumerate(range(0, table.num_rows, 25)):
            files.append(f"label={label}/part-{k:05d}.parquet")
            (root / files[-1]).parent.mkdir(exist_ok=True)
            pq.write_table(table.slice(start, 25).replace_schema_metadata(None), root / files[-1])
    for folder in {p.parent for p in root.rglob("*") if p.is_dir()}:
        if folder != root and not any(folder.rglob("*.parquet")):
            shutil.rmtree(folder, ignore_errors=True)
    legacy = json.loads((root / filenames.MANIFEST).read_text()) | {"format": 1, "files": files}
    (root / filenames.LEGACY_MANIFEST).write_text(json.dumps(legacy))
    (root / filenames.MANIFEST).unlink()
    (root / filenames.CARD).unlink()


def _rows(root: Path) -> list[tuple]:
    frame = pd.concat([pq.read_table(p).to_pandas() for p in sorted(root.rglob("*.parquet"))])
    return sorted(zip(frame["image_id"], frame["label"], frame["split"],
                      (bytes(i["bytes"]) for i in frame["image"])))


def test_a_format_1_folder_opens_with_a_note_and_migrates_in_place(local_sets, tmp_path, caplog):
    import jobs.migrate_shards as job

    old = tmp_path / "old"
    shutil.copytree(local_sets["real"], old)
    _downgrade_to_format_1(old)
    before = _rows(old)
    # What a 0.1 writer killed mid-file left: a truncated temporary file under its old name.
    folder = next(old.glob("label=*"))
    (folder / ".tmp-0123-part-00009.parquet").write_bytes(b"PAR1 cut short")
    # The project's readers still open it, and say how to migrate.
    with caplog.at_level("WARNING", logger="cxrfactory.shards"):
        assert len(ShardDataset(str(old), split="train")) == sum(1 for r in before if r[2] == "train")
    assert f"jobs/migrate_shards.py {old}" in caplog.text
    # A writer asked to write there says the same, and touches nothing.
    with pytest.raises(shards.OutputConflictError, match="migrate"):
        shards.prepare_output(resolve(old), {"kind": "ingest"}, overwrite=False)

    assert job.main([str(old)]) == 0
    assert _rows(old) == before  # every row, label, split and PNG byte kept
    assert not list(old.glob("label=*")) and not (old / filenames.LEGACY_MANIFEST).exists()
    manifest = shards.read_manifest(resolve(old))
    assert manifest.format == shards.FORMAT_VERSION and (old / filenames.CARD).exists()
    check_reader("pandas", str(old), None)
    check_reader("polars", str(old), None)  # its glob meets no leftover file
    # A writer cannot tell whether the migrated set is what its settings would make: it says so.
    with pytest.raises(shards.OutputConflictError, match="migrated from shard format 1"):
        shards.prepare_output(resolve(old), {"kind": "ingest"}, overwrite=False)
    assert job.main([str(old)]) == 0 and _rows(old) == before  # a second run changes nothing


def test_an_unfinished_format_1_run_is_refused_by_writers_and_migration(local_sets, tmp_path):
    import jobs.migrate_shards as job

    old = tmp_path / "old"
    shutil.copytree(local_sets["synthetic"], old)
    _downgrade_to_format_1(old)
    (old / filenames.LEGACY_MANIFEST).unlink()  # its writer stopped before the manifest
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    with pytest.raises(shards.OutputConflictError, match="unfinished run in the layout of format 1"):
        shards.prepare_output(resolve(old), {"kind": "synthesize"}, overwrite=False)
    with pytest.raises(shards.ManifestError, match="unfinished run of format 1"):
        job.main([str(old)])
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before


def test_a_stopped_migration_is_completed_by_running_it_again(local_sets, tmp_path):
    import jobs.migrate_shards as job
    from cxrfactory import shard_migration

    old = tmp_path / "old"
    shutil.copytree(local_sets["synthetic"], old)
    _downgrade_to_format_1(old)
    before = _rows(old)
    legacy = shards.Manifest.from_json((old / filenames.LEGACY_MANIFEST).read_text())
    # Stopped after the new manifest, before any old file was deleted: both layouts on disk.
    finish_set(resolve(old), shard_migration._rewrite(resolve(old), legacy, lambda s: None))
    assert job.main([str(old)]) == 0
    assert _rows(old) == before and not list(old.glob("label=*"))


def test_migrating_what_is_not_a_shard_folder_is_a_clear_error(tmp_path, capsys):
    import jobs.migrate_shards as job
    from cxrfactory.runtime import run_job

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        run_job(job.main, [str(tmp_path)])
    assert exit_info.value.code == 2
    assert "has no _manifest.json" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # A format-1 manifest that is not JSON is named, and nothing is touched.
    (tmp_path / "label=Mass").mkdir()
    (tmp_path / "label=Mass" / "part-00000.parquet").write_bytes(b"PAR1")
    (tmp_path / filenames.LEGACY_MANIFEST).write_bytes(b"\x00\xff not json")
    with pytest.raises(SystemExit) as exit_info:
        run_job(job.main, [str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"{tmp_path / filenames.LEGACY_MANIFEST} is not a valid manifest" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "label=Mass", "manifest.json", "notes.txt", "part-00000.parquet"]

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxrfactory import shards
from cxrfactory.images import decode_png, encode_png
from cxrfactory.storage import StorageError, check_writable, resolve


def _rows(n, label="Mass", size=8):
    rng = np.random.default_rng(0)
    return [{
        "image_id": f"{i:08d}_000.png",
        "image": {"bytes": encode_png(rng.integers(0, 256, (size, size), dtype=np.uint8)),
                  "path": f"{i:08d}_000.png"},
        "label": label, "findings": [label], "split": "train", "patient_id": i,
        "source": "phantom", "seed": None, "generator": None, "height": size, "width": size,
    } for i in range(n)]


def test_png_round_trip_is_exact_and_readable_by_pillow():
    img = np.random.default_rng(1).integers(0, 256, (17, 23), dtype=np.uint8)
    img[5] = img[4]  # a row equal to the one above: the "Up" filter's zeros
    data = encode_png(img)
    np.testing.assert_array_equal(decode_png(data), img)
    with Image.open(io.BytesIO(data)) as decoded:  # an independent decoder
        assert decoded.mode == "L" and decoded.size == (23, 17)
        np.testing.assert_array_equal(np.asarray(decoded), img)
    assert encode_png(img.copy()) == data  # the bytes depend on the pixels only
    for bad in (img.astype(np.float32), np.stack([img, img], axis=-1)):
        with pytest.raises(ValueError, match="uint8"):
            encode_png(bad)


def test_decode_png_converts_16_bit_and_colour_to_8_bit_gray():
    wide = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    # 16-bit: stretched from the image's minimum (0) to its maximum (255).
    np.testing.assert_array_equal(decode_png(buf.getvalue()), [[0, 64], [128, 255]])
    buf = io.BytesIO()
    Image.new("RGBA", (3, 2), (200, 200, 200, 255)).save(buf, format="PNG")
    assert decode_png(buf.getvalue()).tolist() == [[200] * 3] * 2


def test_manifest_from_shards_counts_footers_and_refuses_missing_or_foreign_files(tmp_path):
    root = resolve(tmp_path)
    files = [(shards.shard_path("train", "Mass", 0), "train"),
             (shards.shard_path("val", "Normal", 0), "val"),
             (shards.shard_path("test", "Mass", 0), "test")]
    shards.write_shard(root.join(files[0][0]), shards.make_table(_rows(3)),
                       skipped=[{"path": "x.png", "reason": "missing"}])
    shards.write_shard(root.join(files[1][0]), shards.make_table(_rows(2, "Normal")))
    shards.write_shard(root.join(files[2][0]), shards.make_table([]))  # every input skipped
    manifest = shards.manifest_from_shards(
        root, files, source="phantom", classes=["Normal", "Mass"], config={"classes": ("Mass",)},
        skipped=[{"path": "y.png", "reason": "not in the CSV"}], extra={"resolution": 8})
    assert manifest.counts == {"train": {"Normal": 0, "Mass": 3}, "val": {"Normal": 2, "Mass": 0}}
    assert manifest.files == [f for f, _ in files] and manifest.config == {"classes": ["Mass"]}
    assert [s["path"] for s in manifest.skipped] == ["y.png", "x.png"]
    assert manifest.extra == {"resolution": 8}
    listed = shards.manifest_from_shards(root, files[2:], source="phantom", classes=["Mass"],
                                         splits=["test"])
    assert listed.counts == {"test": {"Mass": 0}}  # a split asked for is listed even when empty

    with pytest.raises(shards.ManifestError, match="holds 3 rows where the plan has 4"):
        shards.manifest_from_shards(root, files[:1], source="phantom", classes=["Mass"],
                                    expected_rows={files[0][0]: 4})
    missing = shards.shard_path("train", "Mass", 1)
    with pytest.raises(shards.ManifestError, match="part-00001.parquet was not written"):
        shards.manifest_from_shards(root, [(missing, "train")], source="phantom", classes=["Mass"])


def test_shard_schema_and_skipped_footer(tmp_path):
    root = resolve(tmp_path)
    loc = root.join(shards.shard_path("train", "Mass", 0))
    shards.write_shard(loc, shards.make_table(_rows(3)), skipped=[{"path": "x.png", "reason": "missing"}])
    table = pq.read_table(loc.path)
    assert table.schema.equals(shards.SCHEMA, check_metadata=False)
    # The Hugging Face features travel in the schema metadata, beside the skipped list.
    assert json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}
    assert shards.shard_footer(loc) == (3, [{"path": "x.png", "reason": "missing"}])
    assert shards.list_shards(root) == ["train/Mass/part-00000.parquet"]
    # No temporary file is left next to the shard.
    assert [p.name for p in (tmp_path / "train" / "Mass").iterdir()] == ["part-00000.parquet"]


def test_manifest_is_trusted_only_when_its_shards_exist(tmp_path):
    root = resolve(tmp_path)
    shards.write_shard(root.join("train/Mass/part-00000.parquet"), shards.make_table(_rows(2)))
    m = shards.Manifest(source="phantom", classes=["Mass"], counts={"train": {"Mass": 2}},
                        files=["train/Mass/part-00000.parquet", "train/Mass/part-00001.parquet"],
                        extra={"fingerprint": "abc"})
    shards.write_manifest(root, m)
    with pytest.raises(shards.ManifestError, match="missing"):
        shards.read_manifest(root)
    back = shards.read_manifest(root, verify=False)
    assert back.extra == {"fingerprint": "abc"} and back.counts == m.counts
    assert json.loads((tmp_path / "_manifest.json").read_text())["format"] == 2
    # A manifest that is not text is named in the error.
    (tmp_path / "_manifest.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(shards.ManifestError, match="_manifest.json is not a valid manifest"):
        shards.read_manifest(root)


def test_prepare_output_resumes_same_plan_and_refuses_another(tmp_path):
    root = resolve(tmp_path / "out")
    assert shards.prepare_output(root, {"a": 1}, overwrite=False) == {"complete": None, "existing": set()}
    shards.write_shard(root.join("train/Mass/part-00000.parquet"), shards.make_table(_rows(1)))
    state = shards.prepare_output(root, {"a": 1}, overwrite=False)
    assert state["existing"] == {"train/Mass/part-00000.parquet"}
    with pytest.raises(shards.OutputConflictError, match="a: 1 -> 2"):
        shards.prepare_output(root, {"a": 2}, overwrite=False)
    assert shards.prepare_output(root, {"a": 2}, overwrite=True)["existing"] == set()


def test_prepare_output_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(shards.OutputConflictError, match="not empty"):
        shards.prepare_output(resolve(tmp_path), {"a": 1}, overwrite=False)
    assert (tmp_path / "notes.txt").exists()


def test_resolve_rejects_bad_uris():
    with pytest.raises(StorageError, match="bucket"):
        resolve("s3://")
    with pytest.raises(StorageError, match="unsupported"):
        resolve("gs://bucket/x")


def test_unwritable_local_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        check_writable(resolve(blocker / "sub"))


def test_s3_round_trip(s3_bucket, s3_endpoint):
    root = resolve(f"{s3_bucket}/shards", s3_endpoint)
    check_writable(root)
    shards.write_shard(root.join("train/Mass/part-00000.parquet"), shards.make_table(_rows(4)))
    m = shards.Manifest(source="phantom", classes=["Mass"], counts={"train": {"Mass": 4}},
                        files=["train/Mass/part-00000.parquet"])
    shards.write_manifest(root, m)
    assert shards.read_manifest(root).total() == 4
    table = shards.read_shard(root.join("train/Mass/part-00000.parquet"))
    assert table.num_rows == 4
    assert decode_png(table["image"][0]["bytes"].as_py()).shape == (8, 8)


def test_s3_unreachable_endpoint_is_a_clear_error():
    root = resolve("s3://bucket/x", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="S3 error"):
        check_writable(root)

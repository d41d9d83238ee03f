"""FDD on Ray Data: exact per-class statistics, sampling, the real-side cache, the tables, and
clear errors for bad input. Checked against features computed directly in this process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cxrfactory import filenames
from tests.shard_helpers import write_synthetic_set
from cxrfactory.images import decode_png, encode_png
from cxrfactory.data import nih
from cxrfactory.data.phantom import PhantomConfig, make_phantom_folder
from cxrfactory.metrics.fdd import PAPER_PROTOCOL, FDDConfig
from cxrfactory.metrics.bank import SAMPLE_SALT, BankArrays, FeatureEmbedder
from cxrfactory.metrics.fdd_pipeline import HALF_SALT, FDDError, side_stats
from cxrfactory.metrics.frechet import frechet_distance
from cxrfactory.classifier.artifact import read_classifier_files, save_classifier_artifact
from cxrfactory.weights import ArtifactError
from cxrfactory.models.densenet import Preprocessing, densenet121_xray
from cxrfactory.raydata import stable_fraction
from cxrfactory.classifier.config import NETWORK_SIZES
from cxrfactory.models.densenet import decode_images

CLASSES = ("Cardiomegaly", "Effusion", "Pneumothorax")
NUM_IMAGES = 120
RES = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def phantom_shards(ray_session, tmp_path_factory) -> Path:
    """Real shards of balanced phantoms at 32 px through the real ingest: by patient, about
    30 train, 3 val and 6 test rows per class."""
    base = tmp_path_factory.mktemp("phantom")
    make_phantom_folder(base / "nih", PhantomConfig(num_images=NUM_IMAGES, resolution=RES,
                                                    classes=CLASSES, balanced=True), workers=1)
    nih.ingest(nih.IngestConfig(nih_root=str(base / "nih"), out=str(base / "real"), resolution=RES,
                                classes=CLASSES, rows_per_file=16), log=lambda _: None)
    return base / "real"


def read_rows(root: Path) -> pd.DataFrame:
    """Every row of a shard folder (the files its manifest lists)."""
    manifest = json.loads((root / filenames.MANIFEST).read_text())
    return pd.concat([pq.read_table(root / f).to_pandas() for f in manifest["files"]], ignore_index=True)


def read_split(root: Path, split: str) -> pd.DataFrame:
    rows = read_rows(root)
    return rows[rows["split"] == split].sort_values("image_id").reset_index(drop=True)


def write_synthetic(real: Path, out: Path, noise: float, seed: int = 0) -> Path:
    """A "synthetic" set made of the real test images plus Gaussian pixel noise (0: identical)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, row in read_split(real, "test").iterrows():
        pixels = decode_png(row["image"]["bytes"]).astype(np.float64)
        pixels = np.clip(pixels + rng.normal(0.0, noise, pixels.shape), 0, 255).astype(np.uint8)
        image_id = f"syn-{row['label']}-{i}"
        rows.append({"image_id": image_id, "image": {"bytes": encode_png(pixels), "path": image_id},
                     "label": row["label"], "findings": [row["label"]], "split": "synthetic",
                     "patient_id": None, "source": "synthetic", "seed": i, "generator": "0" * 64,
                     "height": RES, "width": RES})
    return write_synthetic_set(out, rows, CLASSES)


def tiny_artifact(directory: Path, seed: int, growth_rate: int = 8) -> Path:
    """An untrained tiny DenseNet artifact: features are a fixed random function of the image."""
    torch.manual_seed(seed)
    arch = {**NETWORK_SIZES["tiny"], "growth_rate": growth_rate}
    model = densenet121_xray(num_classes=len(CLASSES), **arch).eval()
    save_classifier_artifact(directory, model, CLASSES, Preprocessing(resolution=RES))
    return directory


@pytest.fixture(scope="session")
def fdd_inputs(phantom_shards, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fdd")
    return {
        "real": phantom_shards,
        "same": write_synthetic(phantom_shards, base / "same", noise=0.0),
        "noisy": write_synthetic(phantom_shards, base / "noisy", noise=25.0),
        "classifier": tiny_artifact(base / "clf", seed=0),
        "other_classifier": tiny_artifact(base / "clf_other", seed=1),
        "wider_classifier": tiny_artifact(base / "clf_wide", seed=0, growth_rate=12),
        "base": base,
    }


def direct_features(rows: pd.DataFrame, artifact_dir: Path) -> np.ndarray:
    """Features computed in this process, one image at a time: the pipeline's reference."""
    from cxrfactory.classifier.artifact import load_classifier_artifact

    artifact = load_classifier_artifact(artifact_dir)
    with torch.inference_mode():
        return np.concatenate([
            artifact.model.features(decode_images([row["image"]], artifact.preprocessing)).double().numpy()
            for _, row in rows.iterrows()])


def run_job(argv: list[str]) -> dict:
    import jobs.fdd as job

    assert job.main(argv) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "fdd.json").read_text())


@pytest.fixture(scope="session")
def first_run(fdd_inputs) -> dict:
    """One full evaluation; later tests reuse its real-side cache."""
    out = fdd_inputs["base"] / "out"
    result = run_job(["--real", str(fdd_inputs["real"]), "--synthetic", f"same={fdd_inputs['same']}",
                      "--synthetic", f"noisy={fdd_inputs['noisy']}",
                      "--classifier", str(fdd_inputs["classifier"]), "--out", str(out),
                      "--batch-rows", "5", "--inference-batch", "3"])
    return {"result": result, "out": out}


def test_fdd_matches_direct_computation(first_run, fdd_inputs) -> None:
    result = first_run["result"]
    test_rows = read_split(fdd_inputs["real"], "test")
    features = direct_features(test_rows, fdd_inputs["classifier"])
    noisy_rows = read_rows(fdd_inputs["noisy"])
    noisy_features = direct_features(noisy_rows, fdd_inputs["classifier"])
    noisy_labels = noisy_rows["label"].to_numpy()
    assert result["classes"] == list(CLASSES)
    half_a = stable_fraction(test_rows["patient_id"], HALF_SALT) < 0.5
    for c in CLASSES:
        mine = (test_rows["label"] == c).to_numpy()
        mu, sigma = features[mine].mean(0), np.cov(features[mine], rowvar=False)
        other = noisy_features[noisy_labels == c]
        expected = frechet_distance(mu, sigma, other.mean(0), np.cov(other, rowvar=False))
        assert result["synthetic"]["noisy"]["fdd"][c] == pytest.approx(expected, rel=1e-4, abs=1e-8)
        assert result["synthetic"]["noisy"]["fdd"][c] > 1e-3
        # the identical set sits at distance 0; its class-consistency is the real one
        assert result["synthetic"]["same"]["fdd"][c] < 1e-6 * np.trace(sigma)
        assert result["synthetic"]["same"]["class_consistency"][c] == result["real"]["class_consistency"][c]
        # the floor: the two patient-disjoint halves, through the same pipeline
        a, b = features[mine & half_a], features[mine & ~half_a]
        assert result["real"]["n_halves"][c] == [len(a), len(b)]
        assert result["real"]["n"][c] == mine.sum() == result["synthetic"]["same"]["n"][c]
        if min(len(a), len(b)) >= 2:
            floor = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
            assert result["floor"][c] == pytest.approx(floor, rel=1e-4, abs=1e-8)
    assert result["synthetic"]["noisy"]["fdd_mean"] == pytest.approx(
        np.mean(list(result["synthetic"]["noisy"]["fdd"].values())))
    assert result["warnings"]  # a handful of images per class for 32 feature dimensions
    assert not result["real"]["statistics_reused"]


def test_sample_metrics_read_the_same_rows(first_run, fdd_inputs) -> None:
    """KID, PRDC and FDD's excess come from the bank rows FDD's statistics were made from: the
    Fréchet distance recomputed from the rows equals the statistics' one, and a set identical
    to the real split sits at the ideal values."""
    result = first_run["result"]
    assert result["metrics"]["selected"] == ["fdd", "class_consistency", "kid", "prdc"]
    for c in CLASSES:
        same, noisy = result["synthetic"]["same"], result["synthetic"]["noisy"]
        for row in (same, noisy):
            assert row["fdd_excess"][c]["fdd"] == pytest.approx(row["fdd"][c], rel=1e-6, abs=1e-9)
            assert row["fdd_excess"][c]["floor"] == pytest.approx(result["floor"][c], rel=1e-6, abs=1e-9)
            lo, hi = row["fdd_excess"][c]["interval"]
            assert lo <= hi
        assert same["fdd_excess"][c]["excess"] < 0  # 0 minus a positive floor
        assert same["prdc"][c]["precision"] == same["prdc"][c]["recall"] == same["prdc"][c]["coverage"] == 1.0
        assert same["kid"][c]["kid"] < noisy["kid"][c]["kid"]


def test_tables_follow_the_paper_layout(first_run) -> None:
    out = first_run["out"]
    csv = pd.read_csv(out / "fdd.csv")
    assert list(csv.columns) == ["metric", "set", *CLASSES, "mean_or_total"]
    fdd = csv[csv["metric"] == "fdd"]
    assert list(fdd["set"]) == ["real vs real (floor)", "same", "noisy"]
    assert float(fdd.set_index("set").loc["noisy", "Effusion"]) == pytest.approx(
        first_run["result"]["synthetic"]["noisy"]["fdd"]["Effusion"])
    assert set(csv["metric"]) == {"fdd", "n_images", "class_consistency"}
    markdown = (out / "fdd.md").read_text()
    assert "| | Cardiomegaly | Effusion | Pneumothorax | mean |" in markdown
    assert "| noisy |" in markdown and "real vs real (floor)" in markdown


def test_real_side_cache_is_reused(first_run, fdd_inputs) -> None:
    out = fdd_inputs["base"] / "again"
    cached = next((first_run["out"] / "cache").glob("real-*.npz"))
    result = run_job(["--real", str(fdd_inputs["real"]), "--synthetic", f"noisy={fdd_inputs['noisy']}",
                      "--classifier", str(fdd_inputs["classifier"]), "--out", str(out),
                      "--real-stats", str(cached)])
    assert result["real"]["statistics_reused"]
    assert result["floor"] == first_run["result"]["floor"]  # read back from the cache, bit for bit
    # Other batch sizes than the first run's: float32 convolutions differ in the last bits
    assert result["synthetic"]["noisy"]["fdd"] == pytest.approx(
        first_run["result"]["synthetic"]["noisy"]["fdd"], rel=1e-5)


def test_max_per_class_keeps_the_n_smallest_hashes(fdd_inputs) -> None:
    """Exactly min(N, available) rows per class and side: those whose image_id hashes lowest,
    so the choice is the same on every run and every cluster."""
    n = 3
    result = run_job(["--real", str(fdd_inputs["real"]), "--synthetic", f"noisy={fdd_inputs['noisy']}",
                      "--classifier", str(fdd_inputs["classifier"]),
                      "--out", str(fdd_inputs["base"] / "capped"), "--max-per-class", str(n)])
    assert result["sampling"] == {"max_per_class": n}

    def chosen(rows: pd.DataFrame, label: str) -> pd.DataFrame:
        rows = rows[rows["label"] == label]
        return rows.iloc[np.argsort(stable_fraction(rows["image_id"], SAMPLE_SALT))[:n]]

    real, noisy = read_split(fdd_inputs["real"], "test"), read_rows(fdd_inputs["noisy"])
    for c in CLASSES:
        a = direct_features(chosen(real, c), fdd_inputs["classifier"])
        b = direct_features(chosen(noisy, c), fdd_inputs["classifier"])
        assert result["real"]["n"][c] == len(a) == min(n, (real["label"] == c).sum())
        assert result["synthetic"]["noisy"]["n"][c] == len(b)
        expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        assert result["synthetic"]["noisy"]["fdd"][c] == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_paper_protocol_is_capped_by_what_exists(first_run, fdd_inputs) -> None:
    result = run_job(["--real", str(fdd_inputs["real"]), "--synthetic", f"noisy={fdd_inputs['noisy']}",
                      "--classifier", str(fdd_inputs["classifier"]),
                      "--out", str(fdd_inputs["base"] / "paper"), "--paper-protocol"])
    # A few phantoms per class: every side draws the real split's count, and the one warning
    # names each class below the paper's count.
    assert result["sampling"] == {"paper_protocol": first_run["result"]["real"]["n"],
                                  "paper_counts": {c: PAPER_PROTOCOL[c] for c in CLASSES}}
    short = [w for w in result["warnings"] if "fewer images than the paper's count" in w]
    assert len(short) == 1 and all(f"{c} {first_run['result']['real']['n'][c]} of "
                                   f"{PAPER_PROTOCOL[c]}" in short[0] for c in CLASSES)
    # the same rows as without a cap
    assert result["real"]["n"] == first_run["result"]["real"]["n"]
    assert result["synthetic"]["noisy"]["fdd"] == pytest.approx(
        first_run["result"]["synthetic"]["noisy"]["fdd"], rel=1e-5)


def test_outputs_and_cache_on_s3(first_run, fdd_inputs, s3_bucket, s3_endpoint) -> None:
    import boto3

    import jobs.fdd as job

    assert job.main(["--real", str(fdd_inputs["real"]), "--synthetic", f"noisy={fdd_inputs['noisy']}",
                     "--classifier", str(fdd_inputs["classifier"]), "--out", f"{s3_bucket}/fdd",
                     "--s3-endpoint", s3_endpoint]) == 0
    s3, bucket = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1"), s3_bucket[5:]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"fdd/fdd.json", "fdd/fdd.csv", "fdd/fdd.md"} <= keys
    assert any(k.startswith("fdd/cache/real-") and k.endswith(".npz") for k in keys)
    stored = json.loads(s3.get_object(Bucket=bucket, Key="fdd/fdd.json")["Body"].read())
    assert stored["synthetic"]["noisy"]["fdd"] == pytest.approx(
        first_run["result"]["synthetic"]["noisy"]["fdd"], rel=1e-5)


def test_side_stats_keys_patient_halves_and_consistency_counts_known_classes() -> None:
    from cxrfactory.metrics.registry import consistency

    rng = np.random.default_rng(0)
    n = 200
    patients = np.array([f"p{i // 2}" for i in range(n)])  # two images per patient
    labels = np.array(["A", "B", "C"] * 66 + ["A", "B"])
    predicted = np.where(np.arange(n) % 4 == 0, "B", labels)  # every 4th row guessed "B"
    rows = BankArrays(np.array([f"img{i}" for i in range(n)]), labels, patients, predicted,
                      rng.normal(size=(n, 3)).astype(np.float32), None)
    side = side_stats(rows, ["A", "B"], halves=True)
    assert set(side.stats.labels) == {"A/a", "A/b", "B/a", "B/b"}  # class C is not evaluated
    first = stable_fraction(patients, HALF_SALT) < 0.5
    for label in ("A", "B"):
        mine = labels == label
        assert side.stats.count(f"{label}/a") == int((mine & first).sum())
        merged = side.by_class()
        np.testing.assert_allclose(merged.mean_cov(label)[0], rows.feature[mine].astype(np.float64).mean(axis=0), rtol=1e-9)
        assert consistency(rows.of_class(label), ("A", "B")) == pytest.approx(float(np.mean(predicted[mine] == label)))
    # a patient's images never straddle the halves
    for p in np.unique(patients):
        assert len(set(first[patients == p])) == 1
    assert side_stats(rows, ["C"], halves=False).stats.count("C") == int((labels == "C").sum())
    assert consistency(rows.of_class("C"), ("A", "B")) is None  # the classifier has no class C


def test_feature_embedder_matches_direct_features(fdd_inputs) -> None:
    """The bank's actor gives each image the features computed one by one in this process,
    the classifier's top-1 class and an area-averaged thumbnail of the stored pixels."""
    from cxrfactory.metrics.bank import THUMB

    rows = read_split(fdd_inputs["real"], "test").head(12)
    table = pa.Table.from_pandas(rows[["image", "label", "image_id", "split", "patient_id"]], preserve_index=False)
    table = table.append_column("bank", pa.array(np.zeros(len(rows), np.int32)))
    embedder = FeatureEmbedder(read_classifier_files(fdd_inputs["classifier"]), inference_batch=5, threads=1)
    out = embedder(table)
    features = np.asarray(out.column("feature").to_pylist(), dtype=np.float64)
    np.testing.assert_allclose(features, direct_features(rows, fdd_inputs["classifier"]), rtol=1e-4, atol=1e-5)
    assert out.column("image_id").to_pylist() == rows["image_id"].tolist()
    assert set(out.column("predicted").to_pylist()) <= set(CLASSES)
    pixels = decode_png(rows["image"].iloc[0]["bytes"]).astype(np.float64)
    block = RES // THUMB if RES >= THUMB else None
    thumb = np.asarray(out.column("thumb")[0].as_py(), dtype=np.float64)
    if block:  # an exact block average when the side divides evenly
        expected = pixels.reshape(THUMB, block, THUMB, block).mean(axis=(1, 3)).reshape(-1)
        np.testing.assert_allclose(thumb, np.round(expected), atol=1)


def test_paper_protocol_counts() -> None:
    config = FDDConfig(real="r", synthetic=(("s", "u"),), classifier="c", out="o", paper_protocol=True)
    assert config.wanted(["Pneumonia", "Mass"]) == {"Pneumonia": 242, "Mass": 729}
    # A real split with fewer rows than the paper's count sets the count of every side, and a
    # synthetic set that cannot match it is refused before any work.
    wanted = config.wanted(["Pneumonia", "Mass"], {"Pneumonia": 51, "Mass": 900})
    assert wanted == {"Pneumonia": 51, "Mass": 729}
    from cxrfactory import shards
    from cxrfactory.metrics.fdd import _require_paper_counts

    def made(n_mass):
        return shards.Manifest(source="synthetic", classes=["Pneumonia", "Mass"], files=[],
                               counts={"synthetic": {"Pneumonia": 242, "Mass": n_mass}})
    _require_paper_counts(wanted, {"big": made(729)})
    with pytest.raises(FDDError, match="synthetic set small holds fewer .* Mass 700 of 729"):
        _require_paper_counts(wanted, {"big": made(729), "small": made(700)})
    assert sum(PAPER_PROTOCOL.values()) == 5859 and "Normal" not in PAPER_PROTOCOL
    with pytest.raises(FDDError, match="not both"):
        FDDConfig(real="r", synthetic=(("s", "u"),), classifier="c", out="o", paper_protocol=True,
                  max_per_class=5)


def test_a_class_without_rows_is_a_clear_error(fdd_inputs, tmp_path) -> None:
    import jobs.fdd as job

    with pytest.raises(FDDError, match="no rows of class Mass"):
        job.main(["--real", str(fdd_inputs["real"]), "--synthetic", f"s={fdd_inputs['same']}",
                  "--classifier", str(fdd_inputs["classifier"]), "--out", str(tmp_path),
                  "--classes", "Effusion", "Mass"])


def test_bad_synthetic_argument_is_a_usage_error(fdd_inputs, tmp_path, capsys) -> None:
    import jobs.fdd as job

    with pytest.raises(SystemExit) as exit_info:
        job.main(["--real", str(fdd_inputs["real"]), "--synthetic", str(fdd_inputs["same"]),
                  "--classifier", str(fdd_inputs["classifier"]), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "NAME=URI" in capsys.readouterr().err


def test_artifact_without_preprocessing_is_refused(fdd_inputs, tmp_path) -> None:
    import jobs.fdd as job

    broken = tmp_path / "broken"
    shutil.copytree(fdd_inputs["classifier"], broken)
    config = json.loads((broken / "config.json").read_text())
    del config["preprocessing"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="config.json: missing the 'preprocessing' entry"):
        job.main(["--real", str(fdd_inputs["real"]), "--synthetic", f"s={fdd_inputs['same']}",
                  "--classifier", str(broken), "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("other, message", [("other_classifier", "another classifier"),
                                            ("wider_classifier", "dimension")])
def test_a_cache_made_by_another_classifier_is_refused(first_run, fdd_inputs, tmp_path, other, message) -> None:
    import jobs.fdd as job

    cached = next((first_run["out"] / "cache").glob("real-*.npz"))
    with pytest.raises(FDDError, match=message):
        job.main(["--real", str(fdd_inputs["real"]), "--synthetic", f"s={fdd_inputs['same']}",
                  "--classifier", str(fdd_inputs[other]), "--out", str(tmp_path),
                  "--real-stats", str(cached)])

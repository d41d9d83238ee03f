"""The feature bank and the memorization audit on phantoms, end to end through the jobs.

Planted cases: a "synthetic" set holding verbatim copies of training images, lightly perturbed
copies, and images of new patients (the real validation split). Every copy must be flagged
with its source as the nearest training image; the new patients only at about the rule's rate.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from cxrfactory import filenames, shards
from tests.shard_helpers import write_synthetic_set
from cxrfactory.classifier.artifact import save_classifier_artifact
from cxrfactory.classifier.config import NETWORK_SIZES
from cxrfactory.data import nih
from cxrfactory.data.phantom import PhantomConfig, make_phantom_folder
from cxrfactory.images import decode_png, encode_png
from cxrfactory.metrics.bank import BankError
from cxrfactory.models.densenet import Preprocessing, densenet121_xray
from cxrfactory.storage import resolve

CLASSES = ("Cardiomegaly", "Effusion", "Pneumothorax")
RES = 32
COPIES, PERTURBED = 6, 6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows_of(root: Path, split: str) -> pd.DataFrame:
    manifest = json.loads((root / filenames.MANIFEST).read_text())
    rows = pd.concat([pq.read_table(root / f).to_pandas() for f in manifest["files"]], ignore_index=True)
    return rows[rows["split"] == split].sort_values("image_id").reset_index(drop=True)


def synthetic_row(image_id: str, label: str, pixels: np.ndarray) -> dict:
    return {"image_id": image_id, "image": {"bytes": encode_png(pixels), "path": image_id},
            "label": label, "findings": [label], "split": "synthetic", "patient_id": None,
            "source": "synthetic", "seed": 0, "generator": "0" * 64, "height": RES, "width": RES}


@pytest.fixture(scope="module")
def planted(ray_session, tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("audit")
    make_phantom_folder(base / "nih", PhantomConfig(num_images=240, resolution=RES, classes=CLASSES,
                                                    balanced=True), workers=1)
    nih.ingest(nih.IngestConfig(nih_root=str(base / "nih"), out=str(base / "real"), resolution=RES,
                                classes=CLASSES, rows_per_file=64), log=lambda _: None)
    train, val = rows_of(base / "real", "train"), rows_of(base / "real", "val")
    rng = np.random.default_rng(0)
    rows, sources = [], {}
    for i, row in train.sample(COPIES + PERTURBED, random_state=0).reset_index(drop=True).iterrows():
        pixels = decode_png(row["image"]["bytes"])
        kind = "copy" if i < COPIES else "perturbed"
        if kind == "perturbed":  # light noise: a copy a generator might emit
            pixels = np.clip(pixels + rng.normal(0, 2.0, pixels.shape), 0, 255).astype(np.uint8)
        image_id = f"syn-{kind}-{i}"
        sources[image_id] = row["image_id"]
        rows.append(synthetic_row(image_id, row["label"], pixels))
    for _, row in val.iterrows():  # new patients
        rows.append(synthetic_row(f"syn-new-{row['image_id']}", row["label"], decode_png(row["image"]["bytes"])))
    torch.manual_seed(0)
    model = densenet121_xray(num_classes=len(CLASSES), **NETWORK_SIZES["tiny"]).eval()
    save_classifier_artifact(base / "clf", model, CLASSES, Preprocessing(resolution=RES))
    torch.manual_seed(1)
    other = densenet121_xray(num_classes=len(CLASSES), **NETWORK_SIZES["tiny"]).eval()
    save_classifier_artifact(base / "clf_other", other, CLASSES, Preprocessing(resolution=RES))
    return {"base": base, "real": base / "real", "synthetic": write_synthetic_set(base / "syn", rows, CLASSES),
            "sources": sources, "new": len(val), "clf": base / "clf", "clf_other": base / "clf_other"}


def audit(planted: dict, out: str, *extra: str) -> dict:
    import jobs.audit as job

    assert job.main(["--real", str(planted["real"]), "--synthetic", str(planted["synthetic"]),
                     "--classifier", str(planted["clf"]), "--out", str(planted["base"] / out), *extra]) == 0
    return json.loads((planted["base"] / out / filenames.AUDIT).read_text())


def test_audit_flags_every_planted_copy_and_few_new_patients(planted) -> None:
    record = audit(planted, "audit")
    flagged = pq.read_table(planted["base"] / "audit" / filenames.FLAGGED).to_pandas()
    by_id = flagged.set_index("image_id")
    for image_id, source in planted["sources"].items():
        assert image_id in by_id.index, f"{image_id} (a copy of {source}) was not flagged"
        assert source in (by_id.loc[image_id, "nearest_real_id"], by_id.loc[image_id, "nearest_real_id_pixel"])
        if image_id.startswith("syn-copy"):
            assert by_id.loc[image_id, "feature_distance"] < 1e-3
            assert by_id.loc[image_id, "pixel_distance"] < 1e-3
    new_flagged = flagged["image_id"].str.startswith("syn-new-").sum()
    # New patients are flagged about as often as the held-out estimate says (a loose bound:
    # the held-out split of this tiny set is a few dozen images, so the rate is coarse).
    assert new_flagged / planted["new"] <= 0.2
    assert record["held_out_flag_rate"] is not None and record["held_out_flag_rate"] <= 0.2
    assert record["flagged_total"] == len(flagged)
    assert sum(record["flagged"].values()) == len(flagged)
    assert sum(record["synthetic"]["n"].values()) == COPIES + PERTURBED + planted["new"]
    assert set(record["thresholds"]) == {"feature", "pixel"}
    assert all(t > 0 for t in record["thresholds"].values())
    closest = record["closest"]
    assert closest[0]["feature_distance"] <= closest[-1]["feature_distance"]
    assert closest[0]["image_id"].startswith("syn-copy")  # distance 0 comes first
    assert (planted["base"] / "audit" / filenames.CLOSEST).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bank_is_reused_hidden_from_readers_and_rebuilt_when_interrupted(planted, capsys) -> None:
    audit(planted, "first")
    banks = sorted((planted["synthetic"] / filenames.FEATURES).rglob(filenames.BANK))
    assert len(banks) == 1
    made = banks[0].stat().st_mtime_ns
    audit(planted, "again")
    assert banks[0].stat().st_mtime_ns == made and "reusing" in capsys.readouterr().out
    # A plain reader of the shard folder does not see the bank's Parquet parts.
    frame = pd.read_parquet(planted["synthetic"])
    assert len(frame) == COPIES + PERTURBED + planted["new"] and "feature" not in frame.columns
    # An interrupted build (parts, no bank.json) is rebuilt, not read.
    banks[0].unlink()
    again = audit(planted, "rebuilt")
    assert banks[0].exists()
    first = json.loads((planted["base"] / "first" / filenames.AUDIT).read_text())
    assert again["flagged"] == first["flagged"] and again["thresholds"] == pytest.approx(first["thresholds"])


def test_a_bank_of_another_classifier_is_refused(planted, tmp_path) -> None:
    audit(planted, "mine")
    import jobs.audit as job

    # The other classifier's banks of the audited set stand where its own would go.
    mine = next((planted["synthetic"] / filenames.FEATURES).iterdir())
    from cxrfactory.classifier.artifact import load_classifier_artifact

    theirs_sha = load_classifier_artifact(planted["clf_other"]).sha256
    theirs = planted["synthetic"] / filenames.FEATURES / theirs_sha[:16]
    shutil.rmtree(theirs, ignore_errors=True)
    shutil.copytree(mine, theirs)
    # The folder names are the identity's fingerprint, so a copied bank sits under a name the
    # other classifier never looks up; rename it to the one it does.
    (bank,) = [p for p in theirs.iterdir() if p.is_dir()]
    from cxrfactory.metrics.bank import BankRequest, identity
    from cxrfactory.metrics.bank import manifest_sha256 as sha_of

    artifact = load_classifier_artifact(planted["clf_other"])
    request = BankRequest(str(planted["synthetic"]), "synthetic", CLASSES, {})
    ident = identity(request, manifest_sha256=sha_of(str(planted["synthetic"]), None),
                     classifier_sha256=artifact.sha256, preprocessing=artifact.preprocessing.to_dict(),
                     feature_dim=artifact.model.feature_dim)
    bank.rename(theirs / f"synthetic-{shards.fingerprint(ident)[:12]}")
    with pytest.raises(BankError, match="another classifier"):
        job.main(["--real", str(planted["real"]), "--synthetic", str(planted["synthetic"]),
                  "--classifier", str(planted["clf_other"]), "--out", str(tmp_path / "x")])
    shutil.rmtree(theirs)


def test_audit_rejects_bad_input(planted, tmp_path) -> None:
    import jobs.audit as job

    base = ["--real", str(planted["real"]), "--synthetic", str(planted["synthetic"]),
            "--classifier", str(planted["clf"]), "--out", str(tmp_path / "o")]
    from cxrfactory.errors import UserError

    with pytest.raises(UserError, match="held-out split must differ"):
        job.main([*base, "--split", "test", "--held-out", "test"])
    with pytest.raises(UserError, match="no rows in split"):
        job.main([*base, "--held-out", "nosuchsplit"])
    with pytest.raises(UserError):
        job.main([*base[:2], "--synthetic", str(tmp_path / "missing"), *base[4:]])
    # A set of another vocabulary (here: a class the real set does not hold) is refused.
    foreign = tmp_path / "foreign"
    shutil.copytree(planted["synthetic"], foreign, ignore=shutil.ignore_patterns("_features"))
    manifest = json.loads((foreign / filenames.MANIFEST).read_text())
    manifest["classes"] = [*manifest["classes"], "Hernia"]
    (foreign / filenames.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="Hernia"):
        job.main([*base[:2], "--synthetic", str(foreign), *base[4:]])
    with pytest.raises(UserError, match="percentile"):
        job.main([*base, "--percentile", "60"])
    assert not (tmp_path / "o" / filenames.AUDIT).exists()


def test_a_bank_whose_parts_disagree_with_its_record_is_refused(planted) -> None:
    audit(planted, "counted")
    (marker,) = (planted["synthetic"] / filenames.FEATURES).rglob(filenames.BANK)
    meta = json.loads(marker.read_text())
    saved = marker.read_text()
    meta["counts"]["Effusion"] += 1  # a part lost or another run's rows: the counts disagree
    marker.write_text(json.dumps(meta))
    import jobs.audit as job

    with pytest.raises(BankError, match="holds .* rows, its bank.json counts"):
        job.main(["--real", str(planted["real"]), "--synthetic", str(planted["synthetic"]),
                  "--classifier", str(planted["clf"]), "--out", str(planted["base"] / "miscounted")])
    marker.write_text(saved)


def test_banks_of_a_set_that_cannot_be_written_go_to_the_fallback(monkeypatch, tmp_path) -> None:
    from cxrfactory.metrics import bank
    from cxrfactory.storage import StorageError

    read_only, fallback = resolve(str(tmp_path / "set")), resolve(str(tmp_path / "out" / "banks"))

    def probe(location):
        if location.path.startswith(read_only.path):
            raise StorageError(f"permission denied: {location.uri}")

    monkeypatch.setattr(bank, "check_writable", probe)
    said = []
    assert bank._writable([read_only, fallback], "s3://bucket/set", said.append) == fallback
    assert "cannot be written" in said[0] and fallback.uri in said[0]
    with pytest.raises(BankError, match="--bank-dir"):
        bank._writable([read_only], "s3://bucket/set", said.append)

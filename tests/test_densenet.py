"""XrayDenseNet: one-channel shapes, features, torchvision weights, preprocessing, artifacts."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.densenet import DenseNet

from cxrfactory.classifier.artifact import (
    load_classifier_artifact,
    read_classifier_config,
    save_classifier_artifact,
)
from cxrfactory.models.densenet import DenseNetConfig, Preprocessing, densenet121_xray, preprocess
from cxrfactory.weights import ArtifactError, WeightsError

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8)
CLASSES = ("Normal", "Cardiomegaly", "Effusion")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(seed: int = 0, num_classes: int = 3, **overrides):
    torch.manual_seed(seed)
    return densenet121_xray(num_classes=num_classes, **{**TINY, **overrides}).eval()


@pytest.mark.parametrize(
    "arch, feature_dim",
    [
        # 8 + 2*4 = 16, halved to 8 by the transition, + 2*4 = 16
        (dict(growth_rate=4, block_config=(2, 2), num_init_features=8), 16),
        # 10 + 6 = 16 -> 8; 8 + 2*6 = 20 -> 10; 10 + 3*6 = 28
        (dict(growth_rate=6, block_config=(1, 2, 3), num_init_features=10), 28),
    ],
)
def test_tiny_shapes_and_feature_dim(arch, feature_dim) -> None:
    torch.manual_seed(0)
    model = densenet121_xray(num_classes=5, **arch).eval()
    assert model.feature_dim == feature_dim
    assert model.trunk.conv0.weight.shape[1] == 1
    x = torch.rand(3, 1, 40, 40)
    with torch.inference_mode():
        features, logits = model.features(x), model(x)
        torch.testing.assert_close(logits, model.classifier(features))
    assert features.shape == (3, model.feature_dim)
    assert logits.shape == (3, 5)
    assert (features >= 0).all()  # taken after the final ReLU
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(3, 3, 40, 40))


def test_real_densenet121_one_forward() -> None:
    torch.manual_seed(0)
    model = densenet121_xray(num_classes=9).eval()
    assert model.feature_dim == 1024 == DenseNetConfig(num_classes=9).feature_dim
    assert tuple(model.trunk.conv0.weight.shape) == (64, 1, 7, 7)
    with torch.inference_mode():
        features = model.features(torch.rand(2, 1, 64, 64))
    assert features.shape == (2, 1024) and torch.isfinite(features).all()


def test_features_match_torchvision_on_replicated_gray(tmp_path) -> None:
    """A torchvision-format RGB state dict loads (conv0 folded to gray, head kept when it fits)
    and gives torchvision's own outputs on a gray image replicated to RGB."""
    torch.manual_seed(1)
    reference = DenseNet(num_classes=3, **TINY).eval()
    # Train-mode-free BN statistics that are not the identity, so the check covers them.
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "tv.pth"
    torch.save(reference.state_dict(), path)

    model = densenet121_xray(num_classes=3, weights_path=path, **TINY).eval()
    gray = torch.rand(2, 1, 48, 48)
    with torch.inference_mode():
        expected_logits = reference(gray.expand(-1, 3, -1, -1))
        expected_features = F.adaptive_avg_pool2d(
            F.relu(reference.features(gray.expand(-1, 3, -1, -1))), 1).flatten(1)
        torch.testing.assert_close(model(gray), expected_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.features(gray), expected_features, rtol=1e-5, atol=1e-5)

    # ImageNet-style head of another size: trunk loads, head stays freshly initialised.
    torch.manual_seed(2)
    model9 = densenet121_xray(num_classes=9, weights_path=path, **TINY).eval()
    with torch.inference_mode():
        torch.testing.assert_close(model9.features(gray), expected_features, rtol=1e-5, atol=1e-5)
    assert model9.classifier.out_features == 9


def test_weights_path_errors(tmp_path) -> None:
    with pytest.raises(WeightsError, match="nowhere.pt"):
        densenet121_xray(num_classes=3, weights_path=tmp_path / "nowhere.pt", **TINY)
    other = tmp_path / "other.pt"
    torch.save(_tiny(num_classes=3, growth_rate=6).state_dict(), other)
    with pytest.raises(WeightsError, match="other.pt: weights do not fit"):
        densenet121_xray(num_classes=3, weights_path=other, **TINY)


def test_preprocessing_scaling_resize_and_channels() -> None:
    prep = Preprocessing(resolution=16, mean=0.5, std=0.25)
    white = np.full((2, 32, 32), 255, dtype=np.uint8)
    out = preprocess(white, prep)
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, (1.0 - 0.5) / 0.25))

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 16, 16), dtype=np.uint8)
    from_uint8 = prep(images)
    from_float = prep(torch.from_numpy(images).float().div(255).unsqueeze(1))
    torch.testing.assert_close(from_uint8, from_float)
    torch.testing.assert_close(from_uint8[:, 0], (torch.from_numpy(images) / 255 - 0.5) / 0.25)

    # RGB (channels-last, as decoded PNGs come) becomes PIL-style luma.
    rgb = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    expected = (0.587 * 200 / 255 - 0.5) / 0.25
    torch.testing.assert_close(prep(rgb), torch.full((1, 1, 16, 16), expected))

    readonly = images.copy()
    readonly.flags.writeable = False
    torch.testing.assert_close(prep(readonly), from_uint8)

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        prep(torch.full((1, 1, 16, 16), 255.0))
    with pytest.raises(ValueError, match="images must be"):
        prep(torch.zeros(2, 5, 16, 16))


def test_preprocessing_json_round_trip() -> None:
    prep = Preprocessing(resolution=64, mean=0.4, std=0.3)
    assert Preprocessing.from_json(prep.to_json()) == prep
    with pytest.raises(ValueError, match="missing.*std"):
        Preprocessing.from_dict({"resolution": 64, "mean": 0.4, "grayscale": True})
    with pytest.raises(ValueError, match="wrong type"):
        Preprocessing.from_dict({**prep.to_dict(), "grayscale": "false"})
    with pytest.raises(ValueError, match="std must be positive"):
        Preprocessing(std=0.0)


def test_artifact_round_trip_identical_outputs(tmp_path) -> None:
    model = _tiny(seed=3)
    prep = Preprocessing(resolution=32)
    digest = save_classifier_artifact(tmp_path / "clf", model, CLASSES, prep,
                                      extra={"val_auroc": 0.5})
    files = sorted(p.name for p in (tmp_path / "clf").iterdir())
    assert files == ["classifier.pt", "config.json", "sha256"]
    assert digest == hashlib.sha256((tmp_path / "clf" / "classifier.pt").read_bytes()).hexdigest()
    assert read_classifier_config(tmp_path / "clf")["extra"] == {"val_auroc": 0.5}

    loaded, classes, loaded_prep, sha = load_classifier_artifact(tmp_path / "clf")
    assert (classes, loaded_prep, sha) == (CLASSES, prep, digest)
    assert loaded.config == model.config and not loaded.training
    x = prep(torch.randint(0, 256, (2, 1, 50, 50), dtype=torch.uint8))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.features(x), model.features(x), rtol=0, atol=0)


def test_artifact_validation_on_save(tmp_path) -> None:
    model = _tiny()
    with pytest.raises(ValueError, match="vocabulary order"):
        save_classifier_artifact(tmp_path, model, ("Effusion", "Normal", "Cardiomegaly"),
                                 Preprocessing())
    with pytest.raises(ValueError, match="2 class names for a model with 3 outputs"):
        save_classifier_artifact(tmp_path, model, ("Normal", "Effusion"), Preprocessing())
    assert list(tmp_path.iterdir()) == []


class _Payload:
    """Unpickling this would run code (here: record that it ran)."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return {}


def test_artifact_load_is_weights_only(tmp_path) -> None:
    directory = tmp_path / "clf"
    save_classifier_artifact(directory, _tiny(), CLASSES, Preprocessing(resolution=32))
    weights = directory / "classifier.pt"
    # A real torch checkpoint whose pickle calls a function on load.
    torch.save({"trunk.conv0.weight": _Payload()}, weights)
    # A matching sha256 so the refusal comes from the weights-only loader, not the checksum.
    (directory / "sha256").write_text(hashlib.sha256(weights.read_bytes()).hexdigest())
    with pytest.raises(WeightsError, match="classifier.pt is not trusted: it holds pickled") as refused:
        load_classifier_artifact(directory)
    assert "weights_only" not in str(refused.value)  # torch's advice to load it anyway
    assert "jobs/train_classifier.py" in str(refused.value)  # where a good one comes from
    assert _Payload.ran is False


def test_corrupt_or_incomplete_artifacts(tmp_path) -> None:
    directory = tmp_path / "clf"
    save_classifier_artifact(directory, _tiny(), CLASSES, Preprocessing(resolution=32))
    weights, config_path = directory / "classifier.pt", directory / "config.json"
    good_weights, good_config = weights.read_bytes(), config_path.read_text()

    weights.write_bytes(good_weights[: len(good_weights) // 2])  # truncated copy
    with pytest.raises(ArtifactError, match="classifier.pt is corrupt: its sha256"):
        load_classifier_artifact(directory)
    weights.write_bytes(good_weights)

    config = json.loads(good_config)
    del config["preprocessing"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="config.json: missing the 'preprocessing' entry"):
        load_classifier_artifact(directory)
    config_path.write_text(good_config[:40])
    with pytest.raises(ArtifactError, match="config.json: corrupt JSON"):
        load_classifier_artifact(directory)
    config_path.unlink()
    with pytest.raises(ArtifactError, match="config.json is missing"):
        load_classifier_artifact(directory)
    config_path.write_text(good_config)
    (directory / "sha256").unlink()
    with pytest.raises(ArtifactError, match="sha256 is missing"):
        load_classifier_artifact(directory)
    with pytest.raises(ArtifactError, match="not a classifier artifact: classifier.pt is missing"):
        load_classifier_artifact(tmp_path / "absent")


def test_artifact_round_trip_through_s3(s3_bucket, s3_endpoint) -> None:
    """Saved to and loaded from s3:// through storage: the same digest, the same weights."""
    model = _tiny(seed=5)
    uri = f"{s3_bucket}/runs/clf"
    digest = save_classifier_artifact(uri, model, CLASSES, Preprocessing(resolution=32),
                                      extra={"epoch": 2}, s3_endpoint=s3_endpoint)
    import boto3

    bucket, key = uri.removeprefix("s3://").split("/", 1)
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    stored = client.get_object(Bucket=bucket, Key=f"{key}/classifier.pt")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == digest
    assert read_classifier_config(uri, s3_endpoint)["extra"] == {"epoch": 2}
    loaded = load_classifier_artifact(uri, s3_endpoint)
    assert loaded.sha256 == digest and loaded.classes == CLASSES
    theirs, ours = loaded.model.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0)

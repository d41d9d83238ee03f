"""Classifier training on Ray Train: metrics against hand computations, the training mix,
augmentation, and end-to-end runs of the job on phantom shards."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_fdd import CLASSES, phantom_shards, read_split, write_synthetic  # noqa: F401 (fixture)

from cxrfactory import shards
from cxrfactory.metrics.classification import auroc, classification_metrics
from cxrfactory.classifier.artifact import load_classifier_artifact
from cxrfactory.classifier.config import ClassifierConfig, ClassifierError
from cxrfactory.classifier.data import expected_positives, plan_mix
from cxrfactory.classifier.driver import _manifest
from cxrfactory.models.densenet import decode_images
from cxrfactory.classifier.worker import augment, inverse_frequency_weights, make_loss


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- metrics ----------------------------------------------------------------------------------


def pairwise_auroc(scores, positives) -> float:
    """The definition: P(score of a positive > score of a negative), ties counting 1/2."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_hand_computation() -> None:
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # a tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4
    assert auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == 0.875
    assert auroc([0.3, 0.2], [1, 0]) == 1.0 and auroc([0.3, 0.2], [0, 1]) == 0.0
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60) / 4.0  # many ties
    positives = rng.random(60) < 0.4
    assert auroc(scores, positives) == pytest.approx(pairwise_auroc(scores, positives), abs=1e-12)


def test_classification_metrics_hand_example() -> None:
    classes = ("Normal", "Effusion", "Mass")
    logits = np.array([[3.0, 0, 0], [0, 2, 0], [0, 0, 1], [0, 4, 0], [1, 0, 0]])
    labels = np.array([0, 1, 2, 2, 1])
    m = classification_metrics(logits, labels, np.eye(3)[labels], classes, "multiclass")
    assert m["accuracy"] == 0.6
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert m["class_accuracy"] == {"Normal": 1.0, "Effusion": 0.5, "Mass": 0.5}
    softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    for i, c in enumerate(classes):
        assert m["auroc"][c] == pytest.approx(pairwise_auroc(softmax[:, i], labels == i))
    assert m["macro_auroc"] == pytest.approx(np.mean(list(m["auroc"].values())))
    # multilabel: each class's AUROC against its own finding column
    targets = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [0, 1, 1], [0, 1, 0]], dtype=np.float32)
    ml = classification_metrics(logits, labels, targets, classes, "multilabel")
    assert ml["auroc"]["Mass"] == pytest.approx(pairwise_auroc(logits[:, 2], targets[:, 2] > 0))


def test_inverse_frequency_weights() -> None:
    assert inverse_frequency_weights([10, 30, 20], "multiclass", 60) == [2.0, pytest.approx(2 / 3), 1.0]
    assert inverse_frequency_weights([10, 0], "multiclass", 10) == [0.5, 0.0]  # an empty class: 0
    assert inverse_frequency_weights([5, 20], "multilabel", 25) == [4.0, 0.25]


def test_augment_is_seeded_and_light() -> None:
    x = decode_images([], ClassifierConfig(real="r", out="o", resolution=32).preprocessing)
    assert x.shape == (0, 1, 32, 32)
    torch.manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    same = [augment(x, torch.Generator().manual_seed(3), std=0.226) for _ in range(2)]
    torch.testing.assert_close(same[0], same[1])
    assert not torch.allclose(same[0], x) and same[0].shape == x.shape
    identity = augment(x, torch.Generator().manual_seed(3), std=0.226, rotation_deg=0, translate=0,
                       scale=0, brightness=0, contrast=0)
    torch.testing.assert_close(identity, x, atol=1e-5, rtol=1e-5)


# -- the training mix ------------------------------------------------------------------------


def manifest(split: str, counts: dict[str, int], val: dict[str, int] | None = None) -> shards.Manifest:
    splits = {split: counts, **({"val": val} if val else {})}
    return shards.Manifest(source="x", classes=list(counts), counts=splits, files=[])


REAL = manifest("train", {"Normal": 100, "Effusion": 10}, val={"Normal": 5, "Effusion": 5})


def test_plan_mix_ratio_balance_and_all() -> None:
    syn = [manifest("synthetic", {"Normal": 30, "Effusion": 30}),
           manifest("synthetic", {"Normal": 10, "Effusion": 90})]
    base = dict(real="real", out="o", synthetic=("s1", "s2"), batch_size=4)
    ratio = plan_mix(ClassifierConfig(**base, synthetic_ratio=0.5), REAL, syn)
    # r / (1 - r) = 1 synthetic row per real row and class, capped by what exists (40 Normal)
    assert [s.per_epoch for s in ratio.sources] == [
        {"Normal": 100, "Effusion": 10}, {"Normal": 30, "Effusion": 3}, {"Normal": 10, "Effusion": 7}]
    assert any("Normal: 100 synthetic rows" in note for note in ratio.notes)
    balanced = plan_mix(ClassifierConfig(**base, balance_per_class=50), REAL, syn)
    assert balanced.class_counts() == [50, 50]
    assert balanced.sources[0].per_epoch == {"Normal": 50, "Effusion": 10}
    everything = plan_mix(ClassifierConfig(**base), REAL, syn)
    assert everything.class_counts() == [140, 130] and not everything.notes
    capped = plan_mix(ClassifierConfig(real="real", out="o", balance_per_class=20, batch_size=4), REAL)
    assert capped.class_counts() == [20, 10]  # without synthetic rows: a cap on real ones


def test_plan_mix_refuses_data_that_cannot_train() -> None:
    config = ClassifierConfig(real="real", out="o", batch_size=4)
    with pytest.raises(ClassifierError, match="val split has rows of 1 class"):
        plan_mix(config, manifest("train", {"Normal": 5, "Effusion": 5}, val={"Normal": 3, "Effusion": 0}))
    with pytest.raises(ClassifierError, match="Effusion has no training rows"):
        plan_mix(config, manifest("train", {"Normal": 5, "Effusion": 0}, val={"Normal": 3, "Effusion": 3}))
    with pytest.raises(ClassifierError, match="no 'train' split"):
        plan_mix(config, manifest("test", {"Normal": 5}))
    with pytest.raises(ClassifierError, match="lower --batch-size"):
        plan_mix(ClassifierConfig(real="real", out="o", batch_size=128), REAL)
    with pytest.raises(ClassifierError, match="needs synthetic shard roots"):
        ClassifierConfig(real="real", out="o", synthetic_ratio=0.5)


# -- end to end ------------------------------------------------------------------------------


def run_job(argv: list[str]) -> None:
    import jobs.train_classifier as job

    assert job.main(argv) == 0


def test_train_multiclass_with_synthetic_exports_the_best_epoch(phantom_shards, tmp_path) -> None:  # noqa: F811
    synthetic = write_synthetic(phantom_shards, tmp_path / "syn", noise=10.0)
    out = tmp_path / "clf"
    run_job(["--real", str(phantom_shards), "--out", str(out), "--smoke", "--epochs", "2",
             "--synthetic", str(synthetic), "--synthetic-ratio", "0.2", "--class-weighted",
             "--cpus-per-worker", "1"])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    for h in history:
        assert set(h["val_auroc"]) == set(CLASSES) and len(h["val_confusion"]) == len(CLASSES)
        assert h["train_images"] == 2 * 8  # --smoke: 2 steps of 8
    artifact = load_classifier_artifact(out / "classifier")
    assert artifact.classes == CLASSES and artifact.preprocessing.resolution == 32
    extra = json.loads((out / "classifier" / "config.json").read_text())["extra"]
    best = max(history, key=lambda h: (h["val_macro_auroc"], h["epoch"]))  # ties: the later one
    assert extra["epoch"] == best["epoch"]
    # 20 % synthetic: a quarter as many synthetic rows as real ones per class, when they exist
    real_train = read_split(phantom_shards, "train")["label"].value_counts()
    made = read_split(phantom_shards, "test")["label"].value_counts()  # the synthetic set's rows
    assert extra["rows_per_epoch"] == {
        c: int(real_train[c] + min(round(real_train[c] / 4), made[c])) for c in CLASSES}
    # The exported network is the one that scored: re-validate it here
    val = read_split(phantom_shards, "val")
    with torch.inference_mode():
        logits = artifact.model(decode_images(list(val["image"]), artifact.preprocessing)).numpy()
    labels = np.array([CLASSES.index(c) for c in val["label"]])
    again = classification_metrics(logits, labels, np.eye(len(CLASSES))[labels], CLASSES, "multiclass")
    assert again["macro_auroc"] == pytest.approx(best["val_macro_auroc"], abs=1e-6)
    assert again["confusion"] == best["val_confusion"]

    # The same run name with other settings would resume the wrong network: refused
    with pytest.raises(ClassifierError, match="started with other settings"):
        run_job(["--real", str(phantom_shards), "--out", str(out), "--smoke", "--mode", "multilabel"])


def test_multilabel_loss_and_expected_positives(phantom_shards, tmp_path) -> None:  # noqa: F811
    """Multilabel mode's pieces (an end-to-end run costs as much as the multiclass one):
    BCE with inverse-frequency pos_weight, and positives counted from ``findings``."""
    logits, targets = torch.tensor([[2.0, -1.0], [0.5, 0.3]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = inverse_frequency_weights([1, 3], "multilabel", 4)  # 3 negatives per positive, 1/3
    loss = make_loss("multilabel", weights, torch.device("cpu"))(logits, targets)
    w = torch.tensor(weights)
    manual = -(w * targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(loss, manual)

    synthetic = write_synthetic(phantom_shards, tmp_path / "syn", noise=5.0)
    config = ClassifierConfig(real=str(phantom_shards), out=str(tmp_path), mode="multilabel",
                              synthetic=(str(synthetic),), balance_per_class=30, batch_size=4)
    mix = plan_mix(config, _manifest(str(phantom_shards), None), [_manifest(str(synthetic), None)])
    # single-finding phantoms: a class's positives are its rows, real and synthetic
    assert expected_positives(config, mix) == pytest.approx([float(n) for n in mix.class_counts()])


@pytest.mark.parametrize("argv, message", [
    (["--synthetic-ratio", "0.5"], "needs synthetic shard roots"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--synthetic", "s", "--synthetic-ratio", "1.5"], "synthetic_ratio must be in"),
])
def test_bad_flags_are_usage_errors(argv, message, capsys) -> None:
    import jobs.train_classifier as job

    with pytest.raises(SystemExit) as exit_info:
        job.main(["--real", "r", "--out", "o", "--smoke", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err

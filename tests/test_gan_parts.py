"""The GAN run's parts that need no cluster: the epoch plan and balanced draws, the branch
pyramid, checkpoints, progress and metrics, the sample mosaic and loss curves, worker resources."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cxrfactory import filenames
from cxrfactory import shards
from cxrfactory.gan.config import Config
from cxrfactory.labels import DEFAULT_CLASSES
from cxrfactory.models import build_discriminators, build_generator
from cxrfactory.gan import plots
from cxrfactory.storage import resolve
from cxrfactory.gan import checkpoint as ckpt
from cxrfactory.gan.data import (
    BalancedDraw,
    EpochPlan,
    TrainingDataError,
    branch_pyramid,
    plan_epochs,
)
from cxrfactory.gan.step import GANTrainer

TINY = {"model.ngf": 16, "model.ndf": 8, "model.base_resolution": 8, "model.num_branches": 2,
        "model.z_dim": 16, "model.num_residual": 1, "gan.d_steps_per_g": 2, "gan.lr_g": 2e-4,
        "gan.lr_d": 2e-4, "gan.tau_every_epochs": 1, "train.use_gpu": False, "train.seed": 3}


def tiny_config(**extra) -> Config:
    return Config().with_overrides({**TINY, "train.batch_size": 8, **extra})


def _manifest(train_counts: dict[str, int]) -> shards.Manifest:
    return shards.Manifest(source="nih", classes=list(DEFAULT_CLASSES), counts={"train": train_counts},
                           files=[])


def test_epoch_plan_balances_classes_and_counts_steps():
    counts = {c: 10 for c in DEFAULT_CLASSES} | {"Normal": 100, "Pneumonia": 3}
    plan = plan_epochs(_manifest(counts), DEFAULT_CLASSES, class_balanced=True, global_batch=16, num_workers=2)
    total = sum(counts.values())  # 173
    assert plan.per_class == -(-total // 9) == 20 and plan.rows == 180
    assert plan.epoch_draw("Pneumonia") == (6, 2) and plan.epoch_draw("Normal") == (0, 20)
    assert plan.worker_batch == 8 and plan.steps_per_epoch == 90 // 8
    natural = plan_epochs(_manifest(counts), DEFAULT_CLASSES, class_balanced=False, global_batch=16, num_workers=1)
    assert natural.per_class is None and natural.rows == total and natural.steps_per_epoch == total // 16


@pytest.mark.parametrize("counts, classes, batch, message", [
    ({c: 5 for c in DEFAULT_CLASSES} | {"Mass": 0}, DEFAULT_CLASSES, 4, "class Mass has no training images"),
    ({c: 5 for c in DEFAULT_CLASSES}, ("Normal", "Hernia"), 4, "Hernia"),
    ({"Normal": 3, "Mass": 2}, ("Normal", "Mass"), 8, "fewer than one step needs"),
])
def test_epoch_plan_rejects_unusable_data(counts, classes, batch, message):
    with pytest.raises(TrainingDataError, match=message):
        plan_epochs(_manifest(counts), classes, class_balanced=True, global_batch=batch, num_workers=1)


def test_report_log_lines_are_quietened_in_workers():
    """Ray logs every report's whole metrics dict through a logger named after its file."""
    import logging

    from ray.train.v2._internal.execution import context

    from cxrfactory.runtime import quiet_train_reports

    report_logger = logging.getLogger(context.__file__)
    previous = report_logger.level
    try:
        quiet_train_reports()
        assert not report_logger.isEnabledFor(logging.INFO)
        assert report_logger.isEnabledFor(logging.WARNING)
    finally:
        report_logger.setLevel(previous)


def test_balanced_draw_counts_are_exact_and_change_per_epoch():
    ids = {"Normal": np.array([f"n{i:02d}" for i in range(30)]), "Pneumonia": np.array(["p0", "p1", "p2"])}
    draw = BalancedDraw(seed=1, per_class=10, class_ids=ids)
    rare = draw.counts("Pneumonia", execution=0)
    assert rare.sum() == 10 and sorted(rare.tolist()) == [3, 3, 4]  # every row 3x, one drawn once more
    common = [draw.counts("Normal", execution=e) for e in range(3)]
    assert all(c.sum() == 10 and set(c.tolist()) <= {0, 1} for c in common)  # without replacement
    assert not np.array_equal(common[0], common[1])  # another subset every epoch ...
    np.testing.assert_array_equal(common[2], BalancedDraw(1, 10, ids).counts("Normal", execution=2))  # ... seeded


def test_branch_pyramid_scales_to_minus_one_one():
    pixels = np.array([[[0, 255], [255, 0]]], dtype=np.uint8).repeat(2, axis=1).repeat(2, axis=2)
    top, low = branch_pyramid(pixels, [2, 4])[1], branch_pyramid(pixels, [2, 4])[0]
    assert top.shape == (1, 1, 4, 4) and top.min() == -1.0 and top.max() == 1.0
    torch.testing.assert_close(low, torch.tensor([[[[-1.0, 1.0], [1.0, -1.0]]]]))


def _trainer(config: Config) -> GANTrainer:
    torch.manual_seed(0)
    return GANTrainer(build_generator(config), build_discriminators(config), config.gan)


def test_checkpoint_round_trip_with_weights_only_and_latest(tmp_path):
    config = tiny_config()
    trainer = _trainer(config)
    reals, c = [torch.rand(4, 1, r, r) * 2 - 1 for r in (8, 16)], F.one_hot(torch.arange(4), 9).float()
    for _ in range(2):
        trainer.train_step(reals, c)
    rng = ckpt.rng_state_bytes(trainer.noise, torch.device("cpu"))
    state = {"step": 2, "epoch": 0, "epoch_step": 2, "tau": trainer.tau, "images_seen": trainer.images_seen,
             "trainer": trainer.state_dict(), "world_size": 1,
             "rng": {k: [ckpt.as_uint8(v)] for k, v in rng.items()}}
    for step in (2, 10):
        ckpt.write_checkpoint(tmp_path / ckpt.checkpoint_dir_name(step), {**state, "step": step}, config)
    (tmp_path / "checkpoint-0000099").mkdir()  # unfinished: no state.pt, must be ignored

    latest = ckpt.find_latest(str(tmp_path))
    assert latest is not None and latest.path.endswith("checkpoint-0000010")
    torch.load(Path(latest.path) / filenames.STATE, weights_only=True)  # no pickled code inside
    loaded, meta = ckpt.read_checkpoint(latest)
    assert loaded["step"] == 10 and meta["classes"] == list(DEFAULT_CLASSES)
    ckpt.check_compatible(meta, config.with_overrides({"gan.lr_g": 1e-3, "train.num_workers": 2}))

    restored = _trainer(config)
    restored.load_state_dict(loaded["trainer"])
    ckpt.restore_rng_states({k: v[0] for k, v in loaded["rng"].items()}, restored.noise, torch.device("cpu"))
    for a, b in zip(trainer.G.parameters(), restored.G.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(trainer._z(3), restored._z(3))  # the noise stream continues

    with pytest.raises(ckpt.CheckpointMismatchError, match=r"model.ngf: checkpoint 16, this run 32.*model.z_dim"):
        ckpt.check_compatible(meta, config.with_overrides({"model.ngf": 32, "model.z_dim": 8}))


def test_sample_mosaic_rows_are_classes_and_tiles_keep_pixels():
    classes, per_class = ("Normal", "Mass", "Nodule"), 2
    low = torch.linspace(-1, 1, 6 * 16).reshape(6, 1, 4, 4)
    high = -torch.ones(6, 1, 8, 8)
    mosaic = plots.sample_mosaic([low, high], per_class)
    gap, group = plots.TILE_GAP, 2 * 8 + plots.TILE_GAP
    assert mosaic.shape == (3 * 8 + 2 * gap, 2 * group + plots.GROUP_GAP)
    # Row 1 (Mass), column 1 of the low branch: image 3, enlarged 2x by pixel repetition.
    tile = mosaic[8 + gap:16 + gap, 8 + gap:16 + gap]
    expected = ((low[3, 0] + 1) * 127.5).round().to(torch.uint8).numpy().repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(tile, expected)
    assert (mosaic[:8, group + plots.GROUP_GAP:group + plots.GROUP_GAP + 8] == 0).all()  # high branch, -1 -> 0
    png = plots.sample_grid_png([low, high], classes, per_class, title="t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plots.sample_mosaic([low, high[:4]], per_class)


def _curves(g_losses: list[float], tmp_path: Path, name: str) -> np.ndarray:
    """The loss-curve figure of 10 steps: D losses fixed, G losses (every other step) given."""
    records = [{"step": s, "d_loss": 1.0 / s, "d_loss_b0": 0.5 / s, "d_loss_b1": 0.5 / s,
                **({"g_loss": g_losses[s // 2 - 1], "g_loss_b0": g_losses[s // 2 - 1] / 3,
                    "g_loss_b1": g_losses[s // 2 - 1] * 2 / 3} if s % 2 == 0 else {})}
               for s in range(1, 11)]
    plots.save_loss_curves(records, str(tmp_path / name), title="run")
    with Image.open(tmp_path / name) as img:
        assert img.size == (1100, 400)
        return np.asarray(img.convert("L"))


def test_loss_curves_draw_each_loss_in_its_panel(tmp_path):
    """The same G losses in another order (same range, so the same axes and ticks): the
    discriminator panel (left) stays pixel for pixel, the generator panel (right) changes."""
    rising = _curves([0.1, 0.2, 0.3, 0.4, 0.5], tmp_path, "rising.png")
    falling = _curves([0.5, 0.4, 0.3, 0.2, 0.1], tmp_path, "falling.png")
    np.testing.assert_array_equal(rising[:, :500], falling[:, :500])
    changed = rising[:, 600:] != falling[:, 600:]
    assert changed.sum() > 500  # whole lines moved, not a few antialiased pixels


def test_progress_means_over_an_interval_and_metrics_log_cut_back_on_resume(tmp_path):
    from types import SimpleNamespace

    from cxrfactory.gan.progress import MetricsLog, Progress

    progress = Progress(total_steps=10, batch_size=4, world=1, is_chief=False)
    progress.begin(0)
    for values in ({"d_loss": 1.0, "tau": 0.0}, {"d_loss": 3.0, "g_loss": 2.0, "tau": 0.0}):
        started = time.perf_counter()
        time.sleep(0.01)  # the "step"
        progress.add(values, seconds=time.perf_counter() - started)
    record = progress.record(SimpleNamespace(step=2, epoch=0), 5, 0.0, [8, 16])
    assert (record["d_loss"], record["g_loss"], record["images"]) == (2.0, 2.0, 8)  # G ran once: its own mean
    assert 0 < record["step_share"] <= 1 and record["images_per_s"] > 0

    loc = resolve(str(tmp_path / "metrics.jsonl"))
    loc.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    log = MetricsLog(loc, enabled=True, resume_step=3)  # steps 4 and 5 will run again
    assert [r["step"] for r in log.records] == [1, 2, 3] and loc.read_text().count("\n") == 3
    log.append({"step": 4})
    assert [json.loads(x)["step"] for x in loc.read_text().splitlines()] == [1, 2, 3, 4]


def test_training_workers_leave_ray_data_a_cpu():
    from cxrfactory.raydata import train_worker_resources as resources

    # CPU clusters: the workers share all CPUs but one, at most 1 each, at least 1/4 in all.
    assert resources(num_workers=2, use_gpu=False, cluster_cpus=8) == {"CPU": 1.0}
    assert resources(num_workers=2, use_gpu=False, cluster_cpus=4) == {"CPU": 1.0}
    assert resources(num_workers=4, use_gpu=False, cluster_cpus=4) == {"CPU": 0.75}
    assert resources(num_workers=2, use_gpu=False, cluster_cpus=1) == {"CPU": 0.125}
    assert resources(num_workers=4, use_gpu=True, cluster_cpus=64) == {"CPU": 1.0, "GPU": 1.0}
    assert resources(num_workers=2, use_gpu=False, cpus_per_worker=3.0, cluster_cpus=1) == {"CPU": 3.0}


def test_epoch_plan_survives_the_trip_to_the_workers():
    """The driver ships ``asdict(plan)`` in the loop config; a worker rebuilds it with
    ``EpochPlan.from_dict``. Through JSON the classes arrive as a list: the rebuilt plan must
    still equal the driver's (a frozen dataclass with a list would differ and not hash) and
    draw the same epochs."""
    from dataclasses import asdict

    counts = {c: 10 for c in DEFAULT_CLASSES} | {"Normal": 100, "Pneumonia": 3}
    plan = plan_epochs(_manifest(counts), DEFAULT_CLASSES, class_balanced=True, global_batch=16,
                       num_workers=2)
    for shipped in (asdict(plan), json.loads(json.dumps(asdict(plan)))):
        rebuilt = EpochPlan.from_dict(shipped)
        assert rebuilt == plan and hash(rebuilt.classes) == hash(plan.classes)
        assert rebuilt.steps_per_epoch == plan.steps_per_epoch
        assert [rebuilt.epoch_draw(c) for c in DEFAULT_CLASSES] == [plan.epoch_draw(c) for c in DEFAULT_CLASSES]

"""GAN training on Ray Train: data plan, checkpoints, figures, distributed runs, resume, the job.

The shards are 63 small images (7 per class) in NIH's layout, ingested at 32 px; the model is
tiny (8/16 px branches). A two-worker run on the session's Ray (4 logical CPUs) writes to S3
(moto) and survives an injected fault; a second cluster, started with `ray start --head` and
stopped by killing only its own processes, then resumes that run by name through the job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cxrfactory import filenames
from cxrfactory import shards
from cxrfactory.gan.artifact import load_generator_artifact
from cxrfactory.gan.config import Config
from cxrfactory.labels import DEFAULT_CLASSES
from cxrfactory.models import build_discriminators, build_generator
from cxrfactory.gan import plots
from cxrfactory.runtime import run_job
from cxrfactory.storage import resolve
from cxrfactory.gan import checkpoint as ckpt
from cxrfactory.gan.data import (
    BalancedDraw,
    EpochPlan,
    TrainingDataError,
    branch_pyramid,
    build_train_dataset,
    load_split_tensors,
    plan_epochs,
    read_train_manifest,
)
from cxrfactory.gan.step import GANTrainer
from cxrfactory.gan.loop import RunOptions, train

REPO = Path(__file__).resolve().parents[1]
RES = 32
PER_CLASS = 7
TINY = {"model.ngf": 16, "model.ndf": 8, "model.base_resolution": 8, "model.num_branches": 2,
        "model.z_dim": 16, "model.num_residual": 1, "gan.d_steps_per_g": 2, "gan.lr_g": 2e-4,
        "gan.lr_d": 2e-4, "gan.tau_every_epochs": 1, "train.use_gpu": False, "train.seed": 3}
TINY_FLAGS = [f"--set={k}={v}" for k, v in TINY.items()]


def tiny_config(**extra) -> Config:
    return Config().with_overrides({**TINY, "train.batch_size": 8, **extra})


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def real_shards(tmp_path_factory, ray_session) -> str:
    """An NIH-layout folder of class-dependent noise images, ingested into 32 px shards."""
    from cxrfactory.data.nih import IngestConfig, ingest

    root = tmp_path_factory.mktemp("nih")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for ci, label in enumerate(DEFAULT_CLASSES):
        for k in range(PER_CLASS):
            pid = 1 + ci * PER_CLASS + k
            name = f"{pid:08d}_000.png"
            pixels = (rng.random((48, 48)) * 60 + ci * 20).astype(np.uint8)  # brightness codes the class
            Image.fromarray(pixels, "L").save(root / "images" / name)
            rows.append({"Image Index": name, "Finding Labels": "No Finding" if label == "Normal" else label,
                         "Follow-up #": 0, "Patient ID": pid, "Patient Age": 50, "Patient Gender": "F",
                         "View Position": "PA"})
    pd.DataFrame(rows).to_csv(root / "Data_Entry_2017.csv", index=False)
    out = tmp_path_factory.mktemp("shards") / "real"
    manifest = ingest(IngestConfig(nih_root=str(root), out=str(out), resolution=RES), log=lambda s: None)
    assert min(manifest.counts["train"].values()) >= 2  # every class can be trained
    return str(out)


# --------------------------------------------------------------------------------------------
# Epoch plan and Ray Data pipeline


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


def test_balanced_stream_is_exact_shuffled_per_epoch_and_ready(ray_session, real_shards):
    manifest = read_train_manifest(real_shards)
    plan = plan_epochs(manifest, DEFAULT_CLASSES, class_balanced=True, global_batch=8, num_workers=1)
    ctx = ray_session.data.DataContext.get_current()
    before = ctx.enable_progress_bars, ctx.print_on_execution_start
    ds = build_train_dataset(real_shards, plan, [8, 16, 32], seed=0)
    # Executed once per epoch by Ray's split coordinator: no progress bars or plan logs there,
    # and the driver's own settings are left as they were.
    assert (ds.context.enable_progress_bars, ds.context.print_on_execution_start) == (False, False)
    assert (ctx.enable_progress_bars, ctx.print_on_execution_start) == before
    epochs = []
    for _ in range(2):
        batches = list(ds.iter_batches(batch_size=None))
        labels = np.concatenate([b["label"] for b in batches])
        assert np.bincount(labels, minlength=9).tolist() == [plan.per_class] * 9  # rare classes repeated
        epochs.append(labels)
    assert not np.array_equal(epochs[0], epochs[1])  # a new draw and order every epoch

    b = batches[0]
    assert [b[f"image_b{i}"].shape[1:] for i in range(3)] == [(1, 8, 8), (1, 16, 16), (1, 32, 32)]
    assert all(b[f"image_b{i}"].dtype == np.float32 for i in range(3))
    assert -1.0 <= b["image_b2"].min() and b["image_b2"].max() <= 1.0
    # Class c's images were drawn around brightness 20c + 30: the label travels with its image.
    means = (b["image_b2"].mean(axis=(1, 2, 3)) + 1) * 127.5
    assert np.abs(means - (20 * b["label"] + 30)).max() < 6
    # Lower branches are exactly GANTrainer's area pyramid of the top image.
    top = torch.from_numpy(b["image_b2"].copy())
    torch.testing.assert_close(torch.from_numpy(b["image_b0"].copy()), F.interpolate(top, size=(8, 8), mode="area"))


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


# --------------------------------------------------------------------------------------------
# Checkpoints and figures (no Ray)


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


# --------------------------------------------------------------------------------------------
# Ray Train runs


@pytest.fixture(scope="module")
def run_bucket(s3_endpoint) -> str:
    """One bucket for this module's runs: the run started here is resumed by a later test."""
    import uuid

    import boto3

    name = f"train-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}/runs"


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in run.join("metrics.jsonl").read_text().splitlines()]


def _steps_per_epoch(real_shards: str, workers: int) -> int:
    plan = plan_epochs(read_train_manifest(real_shards), DEFAULT_CLASSES, class_balanced=True,
                       global_batch=16, num_workers=workers)
    return plan.steps_per_epoch


def test_two_workers_stay_in_sync_and_recover_from_a_fault(ray_session, real_shards, run_bucket, s3_endpoint):
    # 16 images per step (8 per worker): 3-5 steps an epoch, so the retry resumes inside epoch 0
    # (after step 2), stops that epoch's stream when the epoch is done and goes on into epoch 1.
    spe = _steps_per_epoch(real_shards, 2)
    assert 2 < spe < 6
    config = tiny_config(**{"train.num_workers": 2, "train.batch_size": 16, "train.max_steps": 6,
                            "train.checkpoint_every_images": 32, "train.log_every_images": 16})
    options = RunOptions(data=real_shards, run_name="two", storage=run_bucket, s3_endpoint=s3_endpoint,
                         fault_at_step=3, samples_per_class=2)
    result = train(config, options, log=lambda s: None)

    run = resolve(f"{run_bucket}/two", s3_endpoint)
    assert run.join(".fault-injected-at-3").exists()  # the fault did fire ...
    assert result.resumed_from == 2 and result.step == 6  # ... and the run went on from step 2
    assert len(result.param_digests) == 2 and len(set(result.param_digests)) == 1  # replicas identical
    records = _metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # step 3 logged once, after the retry
    assert [r["epoch"] for r in records] == [(s - 1) // spe for s in range(1, 7)]
    assert [r["tau"] for r in records] == [0.1 * ((s - 1) // spe) for s in range(1, 7)]  # +0.1 per epoch here
    state, meta = ckpt.read_checkpoint(run.join("checkpoint-0000006"))  # weights_only=True inside
    assert (state["step"], state["epoch"], state["epoch_step"], state["world_size"]) == (6, *divmod(6, spe), 2)
    assert not torch.equal(state["rng"]["noise"][0], state["rng"]["noise"][1])  # per-rank noise
    assert meta["config"]["model"] == config.to_dict()["model"]
    assert run.join("samples").list_files() == [f"step-000000{s}.png" for s in (2, 4, 6)]
    assert run.join("loss_curves.png").is_file()
    artifact = load_generator_artifact(run.join("generator"))
    assert artifact.config.model == config.model and artifact.meta["step"] == 6


def test_plain_loop_helper_reads_the_same_split(real_shards):
    images, labels = load_split_tensors(real_shards, DEFAULT_CLASSES, [8, 16, 32])
    manifest = read_train_manifest(real_shards)
    assert len(labels) == manifest.total("train") and [x.shape[-1] for x in images] == [8, 16, 32]
    assert np.bincount(labels.numpy(), minlength=9).tolist() == list(manifest.counts["train"].values())


# --------------------------------------------------------------------------------------------
# Bad input: clear one-line errors, exit status 2, before any worker starts


def _job_error(argv, capsys) -> str:
    import jobs.train as job

    with pytest.raises(SystemExit) as exit_info:
        run_job(job.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_inputs_give_clear_errors(real_shards, run_bucket, s3_endpoint, tmp_path, capsys):
    base = ["--run-name", "bad", "--storage", str(tmp_path / "runs"), *TINY_FLAGS]
    assert "does not exist" in _job_error(["--data", str(tmp_path / "nowhere"), *base], capsys)
    assert "unknown preset 'papr'" in _job_error(["--data", real_shards, "--preset", "papr", *base], capsys)
    assert "--checkpoint-every must be >= 1" in _job_error(["--data", real_shards, "--checkpoint-every", "0", *base],
                                                           capsys)

    empty = tmp_path / "empty-class"
    shutil.copytree(real_shards, empty)
    manifest = json.loads((empty / "_manifest.json").read_text())
    manifest["counts"]["train"]["Pneumonia"] = 0
    (empty / "_manifest.json").write_text(json.dumps(manifest))
    assert "class Pneumonia has no training images" in _job_error(["--data", str(empty), *base], capsys)

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = _job_error(["--data", real_shards, "--run-name", "bad", "--storage", str(blocker), *TINY_FLAGS], capsys)
    assert "cannot write" in err

    if resolve(f"{run_bucket}/two/checkpoint-0000006/state.pt", s3_endpoint).exists():  # the run above
        err = _job_error(["--data", real_shards, "--run-name", "two", "--storage", run_bucket,
                          "--s3-endpoint", s3_endpoint, *TINY_FLAGS, "--set", "model.ngf=32"], capsys)
        assert "different model config" in err and "model.ngf: checkpoint 16, this run 32" in err


# --------------------------------------------------------------------------------------------
# A separate cluster: the job joins it unchanged (RAY_ADDRESS), and `ray job submit` runs it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_jobs_api() -> bool:
    try:
        import aiohttp  # noqa: F401  (the dashboard, hence the Jobs API, needs ray[default])
    except ImportError:
        return False
    return True


def _session_processes(sid: int) -> list[int]:
    """Pids of the processes in session ``sid`` (Linux /proc): the head node and its children."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # fields after the name: state, ppid, pgrp, session, ...
                pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """``ray start --head --block`` in a session of its own; teardown signals that session's
    processes only (``ray stop`` would stop every Ray on the machine, the tests' own included)."""
    port, dash = _free_port(), _free_port()
    temp = tmp_path_factory.mktemp("ray-head")
    ray_cli = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}",
           f"--include-dashboard={str(_has_jobs_api()).lower()}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", "--disable-usage-stats",
           # The session's own Ray holds the default agent ports; this cluster needs its own.
           f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
           f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while subprocess.run([ray_cli, "status", f"--address={address}"], env=env,
                             capture_output=True).returncode != 0:
            assert proc.poll() is None and time.time() < deadline, "ray start --head did not come up"
            time.sleep(1)
        # The dashboard (the Jobs API) comes up after the GCS answers `ray status`.
        while _has_jobs_api():
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "the dashboard did not come up"
                time.sleep(1)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 0)):
            for pid in _session_processes(proc.pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while _session_processes(proc.pid) and time.time() < deadline:
                time.sleep(0.5)
        proc.wait(timeout=10)


def test_restarted_run_resumes_on_another_cluster(head_node, real_shards, run_bucket, s3_endpoint):
    """The job joins a running cluster the way `ray job submit` starts it (RAY_ADDRESS set) and,
    given the same run name, resumes the run the test above left on S3 instead of restarting."""
    run = resolve(f"{run_bucket}/two", s3_endpoint)
    if not run.join("checkpoint-0000006", "state.pt").exists():
        pytest.skip("needs the run of test_two_workers_stay_in_sync_and_recover_from_a_fault")
    before = run.join("metrics.jsonl").read_text()
    argv = [sys.executable, "jobs/train.py", "--data", real_shards, "--run-name", "two", "--storage", run_bucket,
            "--s3-endpoint", s3_endpoint, "--num-workers", "1", "--batch-size", "16", "--max-steps", "8",
            "--checkpoint-every", "2", "--log-every", "1", "--samples-per-class", "2", *TINY_FLAGS,
            "--set=train.class_balanced=true"]  # as the run above (tiny_config); the paper preset has no sampler
    env = {**head_node["env"], "RAY_ADDRESS": head_node["address"]}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "resuming from step 6" in out and "resumed from step 6" in out and "replicas in sync: yes" in out
    assert f"done: step 8, epoch {8 // _steps_per_epoch(real_shards, 1)}," in out
    assert run.join("metrics.jsonl").read_text().startswith(before)  # steps 1-6 kept, not redone
    assert [r["step"] for r in _metrics(run)] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert run.join("samples", "step-0000008.png").is_file()
    assert json.loads(run.join("config.json").read_text())["config"]["train"]["num_workers"] == 1
    assert load_generator_artifact(run.join("generator")).meta["step"] == 8


@pytest.mark.skipif(not _has_jobs_api(), reason="the Jobs API needs the dashboard: install ray[default]")
def test_ray_job_submit_runs_the_training_job(head_node, real_shards, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head_node["dashboard"])
    deadline = time.time() + 240
    while True:  # the job agent starts a little after the dashboard answers
        try:
            job_id = client.submit_job(
                entrypoint=f"python jobs/train.py --data {real_shards} --run-name submitted "
                           f"--storage {tmp_path} --smoke",
                runtime_env={"working_dir": str(REPO),
                             "excludes": [".venv", "runs", "demo_output", ".git"]},
            )
            break
        except RuntimeError as error:
            assert "No available agent" in str(error) and time.time() < deadline, error
            time.sleep(2)
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "done: step 2" in logs and (tmp_path / "submitted" / "generator" / "sha256").exists()


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

"""GAN training on Ray Train: the balanced stream, distributed runs, resume, the job (the parts
that need no cluster: tests/test_gan_parts.py).

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

from cxrfactory.gan.artifact import load_generator_artifact
from cxrfactory.gan.config import Config
from cxrfactory.labels import DEFAULT_CLASSES
from cxrfactory.runtime import run_job
from cxrfactory.storage import resolve
from cxrfactory.gan import checkpoint as ckpt
from cxrfactory.gan.data import (
    build_train_dataset,
    load_split_tensors,
    plan_epochs,
    read_train_manifest,
)
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


# --------------------------------------------------------------------------------------------
# Checkpoints and figures (no Ray)


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



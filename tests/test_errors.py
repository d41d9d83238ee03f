"""The one error policy: a UserError is one ``error:`` line and exit status 2, wherever it was
raised (also in a Ray worker); anything else keeps its traceback and exits 1."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxrfactory.errors import UserError, find_user_error
from cxrfactory.runtime import init_ray, run_job
from cxrfactory.storage import StorageError, resolve
from cxrfactory.weights import WeightsError, load_weights

REPO = Path(__file__).resolve().parents[1]


def _exit(main, capsys) -> tuple[int, list[str]]:
    """Run ``main`` through run_job: (exit status, stderr's ``error:`` lines)."""
    with pytest.raises(SystemExit) as stopped:
        run_job(main, [])
    lines = capsys.readouterr().err.splitlines()
    return stopped.value.code, [line for line in lines if line.startswith("error:")]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_user_error_is_one_line_and_status_2(capsys):
    def main(argv):
        raise StorageError("output s3://b/x cannot be written")

    assert _exit(main, capsys) == (2, ["error: output s3://b/x cannot be written"])


def test_an_internal_value_error_keeps_its_traceback_and_status_1():
    # A fresh interpreter: what a user sees is Python's own report of the uncaught error.
    code = ("from cxrfactory.runtime import run_job\n"
            "def main(argv):\n"
            "    raise ValueError('array shapes do not broadcast')\n"
            "run_job(main)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: array shapes do not broadcast" in done.stderr
    assert "error:" not in done.stderr.replace("ValueError:", "")


def test_a_bug_while_handling_a_user_error_is_not_disguised(capsys):
    def main(argv):
        try:
            raise StorageError("cannot read x")
        except StorageError:
            raise KeyError("a bug in the handler")  # its context is the user error

    with pytest.raises(KeyError):
        run_job(main, [])
    assert "error:" not in capsys.readouterr().err
    try:
        try:
            raise StorageError("cannot read x")
        except StorageError as error:
            raise RuntimeError("wrapped on purpose") from error
    except RuntimeError as wrapped:
        assert isinstance(find_user_error(wrapped), StorageError)  # an explicit cause is followed


def test_a_user_error_is_found_inside_ray_wrappers():
    from ray.exceptions import RayTaskError, UserCodeException
    from ray.train.v2.api.exceptions import WorkerGroupError

    cause = StorageError("cannot write x: no space left on the device")
    task = RayTaskError("ShardWriter.__call__", "Traceback ...\n" * 60, cause).as_instanceof_cause()
    assert isinstance(task, StorageError)  # Ray's dual class: its message is the whole traceback
    try:
        try:
            raise task
        except Exception as error:
            raise UserCodeException("UDF failed to process a data block.") from error
    except UserCodeException as wrapped:
        assert find_user_error(wrapped) is cause
    failed = WorkerGroupError("Training failed", {1: RuntimeError("oom"), 0: task})
    assert find_user_error(failed) is cause
    assert find_user_error(WorkerGroupError("Training failed", {0: RuntimeError("nccl")})) is None
    assert find_user_error(ValueError("internal")) is None


def test_a_full_disk_is_a_storage_error_that_says_how_to_finish(tmp_path, monkeypatch):
    loc = resolve(tmp_path / "part-00000.parquet")
    loc.write_bytes(b"the file a first run wrote")
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(StorageError) as full:
        loc.write_bytes(b"a rewrite that does not fit")
    message = str(full.value)
    assert "no space left on the device" in message and loc.uri in message
    assert "run the same command again" in message
    assert isinstance(full.value.__cause__, OSError)
    # What was on disk is intact, and the failed write left no temporary file behind.
    assert (tmp_path / "part-00000.parquet").read_bytes() == b"the file a first run wrote"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.parquet"]


def test_a_disk_quota_is_reported_like_a_full_disk(tmp_path, monkeypatch):
    if not hasattr(errno, "EDQUOT"):
        pytest.skip("no EDQUOT on this platform")

    def over_quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "fsync", over_quota)
    with pytest.raises(StorageError, match="disk quota exceeded.*run the same command again"):
        resolve(tmp_path / "x.bin").write_bytes(b"x")


def test_a_user_error_in_a_ray_data_worker_is_one_line_and_status_2(ray_session, tmp_path, capsys,
                                                                   monkeypatch):
    import ray

    # Defined here so that Ray pickles it by value: workers cannot import the test module.
    class FullDiskWriter:
        """A Ray Data stage whose storage write hits a full disk (os.fsync fails with ENOSPC
        in the worker, for this call only)."""

        def __call__(self, batch):
            def disk_full(*args, **kwargs):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            real, os.fsync = os.fsync, disk_full
            try:
                resolve(out).join(f"part-{int(batch['id'][0]):05d}.bin").write_bytes(b"rows")
            finally:
                os.fsync = real
            return batch

    out = str(tmp_path)
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "raise_original_map_exception", context.raise_original_map_exception)

    def main(argv):
        init_ray()  # as every job does before its pipeline
        ray.data.range(2, override_num_blocks=2).map_batches(
            FullDiskWriter, batch_size=1, compute=ray.data.ActorPoolStrategy(size=1)).take_all()

    code, errors = _exit(main, capsys)
    assert code == 2
    assert len(errors) == 1, errors
    assert "no space left on the device" in errors[0] and "run the same command again" in errors[0]
    assert "Traceback" not in errors[0] and "UDF failed" not in errors[0]


class _Payload:
    """Unpickling this would run code (here: record that it ran)."""

    ran = False

    def __reduce__(self):
        return (_Payload._mark, ())

    @staticmethod
    def _mark():
        _Payload.ran = True
        return {}


def test_a_file_holding_pickled_objects_is_refused_in_our_words():
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "extra": _Payload()}, buffer)
    with pytest.raises(WeightsError) as refused:
        load_weights(buffer.getvalue(), source="runs/x/generator/generator.pt",
                     made_by="jobs/train.py (<run>/generator)")
    message = str(refused.value)
    assert isinstance(refused.value, UserError)
    assert message.startswith("runs/x/generator/generator.pt is not trusted: it holds pickled")
    assert "was not loaded" in message and "jobs/train.py" in message
    assert "weights_only" not in message and "Weights only load failed" not in message
    assert refused.value.__cause__ is None and refused.value.__suppress_context__
    assert _Payload.ran is False


def test_plain_weights_load():
    buffer = io.BytesIO()
    torch.save({"weight": torch.arange(3.0), "step": 4}, buffer)
    state = load_weights(buffer.getvalue(), source="state.pt", made_by="jobs/train.py")
    assert state["step"] == 4 and torch.equal(state["weight"], torch.arange(3.0))
    with pytest.raises(WeightsError, match="state.pt is not a readable weights file"):
        load_weights(buffer.getvalue()[:20], source="state.pt", made_by="jobs/train.py")


def test_ingest_refuses_a_csv_without_a_column_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    import jobs.ingest_nih as job

    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    (root / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels\n00000001_000.png,Mass\n")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(job, "init_ray", no_ray)
    monkeypatch.setattr(ray, "init", no_ray)
    was_up = ray.is_initialized()
    with pytest.raises(SystemExit) as stopped:
        run_job(job.main, ["--nih-root", str(root), "--out", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert stopped.value.code == 2
    assert len(errors) == 1 and "Patient ID" in errors[0], errors
    assert ray.is_initialized() == was_up
    assert not (tmp_path / "out").exists()  # nothing written either

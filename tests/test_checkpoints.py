"""The training-checkpoint format both products share (cxrfactory/checkpoints.py)."""

from __future__ import annotations

import json

import pytest
import torch

from cxrfactory import filenames
from cxrfactory.checkpoints import CheckpointMismatchError, read_checkpoint, write_checkpoint
from cxrfactory.storage import resolve
from cxrfactory.weights import WeightsError

MADE_BY = "jobs/train_classifier.py"


def test_round_trip_keeps_state_and_meta(tmp_path) -> None:
    net = torch.nn.Linear(3, 2)
    write_checkpoint(tmp_path / "c", {"model": net.state_dict(), "epoch": 4}, {"classes": ["A", "B"]})
    for where in (tmp_path / "c", resolve(str(tmp_path / "c"))):  # a path or a storage location
        state, meta = read_checkpoint(where, made_by=MADE_BY)
        assert state["epoch"] == 4 and torch.equal(state["model"]["weight"], net.weight.detach())
        assert meta["classes"] == ["A", "B"] and "created" in meta


def test_a_state_of_another_format_is_refused(tmp_path) -> None:
    write_checkpoint(tmp_path, {"epoch": 1}, {})
    torch.save({"format": 99, "epoch": 1}, tmp_path / filenames.STATE)
    with pytest.raises(CheckpointMismatchError, match=f"format 99 is not 1; use one written by {MADE_BY}"):
        read_checkpoint(tmp_path, made_by=MADE_BY)
    torch.save({"epoch": 1}, tmp_path / filenames.STATE)  # written by something else
    with pytest.raises(CheckpointMismatchError, match="format None"):
        read_checkpoint(tmp_path, made_by=MADE_BY)


class _Payload:
    pass


def test_a_state_with_pickled_objects_is_not_loaded(tmp_path) -> None:
    write_checkpoint(tmp_path, {"epoch": 1}, {})
    torch.save({"format": 1, "payload": _Payload()}, tmp_path / filenames.STATE)
    with pytest.raises(WeightsError, match="not trusted") as caught:
        read_checkpoint(tmp_path, made_by=MADE_BY)
    assert "weights_only" not in str(caught.value) and MADE_BY in str(caught.value)
    assert json.loads((tmp_path / filenames.CONFIG).read_text())["created"]

"""Training checkpoints, one format for both products (the GAN and the classifier).

A checkpoint is a directory with two files (docs/architecture.md, "Artifacts and checkpoints")::

    state.pt      {"format": CHECKPOINT_FORMAT, ...}: state dicts, counters, RNG states;
                  tensors and plain values only, read with torch.load(weights_only=True)
    config.json   what the run was: its resolved config, the class vocabulary, where the
                  checkpoint sits in the run (step/epoch), the metrics it was kept for

What goes into ``state`` and ``config.json`` is each product's business (``gan/checkpoint.py``,
``classifier/worker.py``); writing, reading, the trust check and the format check live here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cxrfactory import filenames
from cxrfactory.errors import UserError
from cxrfactory.storage import Location, resolve
from cxrfactory.weights import load_weights

CHECKPOINT_FORMAT = 1


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint this run cannot resume from (another format, another model)."""


def write_checkpoint(directory: str | Path, state: Mapping[str, Any],
                     meta: Mapping[str, Any]) -> None:
    """Write ``state.pt`` and ``config.json`` (``meta`` plus the time) into a local directory,
    the one a Ray Train ``Checkpoint.from_directory`` then persists."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"format": CHECKPOINT_FORMAT, **state}, directory / filenames.STATE)
    meta = {**meta, "created": datetime.now(timezone.utc).isoformat()}
    (directory / filenames.CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def read_checkpoint(directory: str | Path | Location, *, made_by: str,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)`` of a checkpoint directory (a local path or a storage location).

    ``made_by`` names the job whose checkpoints are good, for the refusal of an untrusted or
    foreign file; a state of another format is refused with :class:`CheckpointMismatchError`.
    """
    loc = directory if isinstance(directory, Location) else resolve(str(directory))
    source = loc.join(filenames.STATE).uri
    state = load_weights(loc.join(filenames.STATE).read_bytes(), source=source, made_by=made_by,
                         map_location=map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointMismatchError(f"{source}: checkpoint format {found!r} is not "
                                      f"{CHECKPOINT_FORMAT}; use one written by {made_by}")
    return state, json.loads(loc.join(filenames.CONFIG).read_text())

"""GAN training checkpoints: ``state.pt`` + ``config.json`` in one directory, in the format
both products share (:mod:`cxrfactory.checkpoints`).

``state.pt`` holds only tensors and plain Python values, so ``torch.load(weights_only=True)``
reads it and a checkpoint from a stranger cannot execute code::

    format        checkpoints.CHECKPOINT_FORMAT
    step          real batches trained (GANTrainer.train_step calls, all workers together)
    epoch         the epoch in progress; epoch_step: steps already done inside it
    tau           attention scale at that point
    images_seen   real images consumed by D steps, all workers
    trainer       GANTrainer.state_dict(): G, G_ema, every D, both Adam states, counters
    rng           per-rank RNG states as uint8 tensors: {"torch": [...], "noise": [...], "cuda": [...]}
    world_size    workers that wrote it (per-rank RNG states are reused only for the same count)

``config.json`` holds the resolved run config (model, gan, train), the class vocabulary and
where the checkpoint sits in the run. A run resumes only from a checkpoint whose ``model``
section equals its own: :func:`check_compatible` names every differing field otherwise.

Directories are named ``checkpoint-<step:07d>`` inside the run folder (Ray Train's
``checkpoint_dir_name``), so the latest one can be found without Ray (:func:`find_latest`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cxrfactory import checkpoints, filenames
from cxrfactory.checkpoints import CheckpointMismatchError
from cxrfactory.gan.config import Config
from cxrfactory.storage import Location, resolve

MADE_BY = "jobs/train.py (<run>/checkpoint-<step>)"  # where a good checkpoint comes from
_DIR_PATTERN = re.compile(r"^checkpoint-(\d{7,})$")


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint-0001200``: sortable, one per step."""
    return f"checkpoint-{step:07d}"


def write_checkpoint(directory: str | Path, state: Mapping[str, Any], config: Config,
                     extra: Mapping[str, Any] | None = None) -> None:
    """Write ``state.pt`` and ``config.json`` into a local ``directory`` (created if needed)."""
    meta = {"config": config.to_dict(), "classes": list(config.model.classes),
            "step": int(state["step"]), "epoch": int(state["epoch"]), **(extra or {})}
    checkpoints.write_checkpoint(directory, state, meta)


def read_checkpoint(directory: str | Path | Location,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)`` of a checkpoint directory (local path or storage location).

    ``state`` is loaded with ``weights_only=True``; ``meta`` is the parsed ``config.json``.
    """
    return checkpoints.read_checkpoint(directory, made_by=MADE_BY, map_location=map_location)


def model_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``["model.ngf: checkpoint 64, this run 32", ...]`` for every differing model field."""
    out = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, tuple):
            old = list(old)
        if isinstance(new, tuple):
            new = list(new)
        if old != new:
            out.append(f"model.{key}: checkpoint {old!r}, this run {new!r}")
    return out


def check_compatible(meta: Mapping[str, Any], config: Config, where: str = "the checkpoint") -> None:
    """Refuse (``CheckpointMismatchError``) a checkpoint whose model section differs from ours.

    Other sections (learning rates, epochs, workers) may change between a run and its resume.
    """
    saved = (meta.get("config") or {}).get("model")
    if saved is None:
        raise CheckpointMismatchError(f"{where} has no model config; it was not written by this trainer")
    diffs = model_differences(saved, config.to_dict()["model"])
    if diffs:
        raise CheckpointMismatchError(
            f"{where} was trained with a different model config ({'; '.join(diffs)}); "
            "resume it with the same model settings, or choose a new --run-name"
        )


def find_latest(run: str | Location, s3_endpoint: str | None = None) -> Location | None:
    """The highest-step ``checkpoint-*`` directory below ``run`` holding both files, or None."""
    loc = run if isinstance(run, Location) else resolve(run, s3_endpoint)
    steps = []
    for rel in loc.list_files(filenames.STATE):
        parts = rel.split("/")
        match = _DIR_PATTERN.match(parts[0]) if len(parts) == 2 else None
        if match:
            steps.append((int(match.group(1)), parts[0]))
    for _, name in sorted(steps, reverse=True):
        if loc.join(name, filenames.CONFIG).is_file():
            return loc.join(name)
    return None


# --------------------------------------------------------------------------------------------
# RNG states: uint8 tensors, so they pass weights_only loading and travel between ranks as bytes


def rng_state_bytes(noise: torch.Generator, device: torch.device) -> dict[str, bytes]:
    """This process's RNG states as bytes: torch's CPU RNG, the GAN noise stream, CUDA's RNG."""
    out = {"torch": torch.get_rng_state().numpy().tobytes(),
           "noise": noise.get_state().cpu().numpy().tobytes()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device).numpy().tobytes()
    return out


def as_uint8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def restore_rng_states(states: Mapping[str, torch.Tensor], noise: torch.Generator,
                       device: torch.device) -> None:
    """Inverse of :func:`rng_state_bytes` (after :func:`as_uint8`) for one rank."""
    torch.set_rng_state(states["torch"].cpu())
    noise.set_state(states["noise"].cpu())
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)

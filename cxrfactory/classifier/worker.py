"""The Ray Train worker loop of the classifier, with its augmentation and loss.

Every rank runs :func:`train_loop_per_worker`; rank 0 writes the checkpoint (the bare network,
optimiser and schedule, loadable with ``weights_only=True``) and ``metrics.jsonl`` (Train V2
keeps no metrics reported without a checkpoint). Each epoch every rank calls
``ray.train.report`` exactly once: a rank that skipped it would leave the others waiting.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrfactory.checkpoints import read_checkpoint, write_checkpoint
from cxrfactory.metrics.classification import classification_metrics, jsonable
from cxrfactory.storage import resolve
from cxrfactory.classifier.config import ClassifierConfig, build_model



def augment(x: torch.Tensor, generator: torch.Generator, *, std: float,
            rotation_deg: float = 5.0, translate: float = 0.04, scale: float = 0.05,
            brightness: float = 0.08, contrast: float = 0.1) -> torch.Tensor:
    """Light per-image jitter of a normalised batch (B, 1, H, W): small rotation, shift and
    zoom (border pixels repeat, so no black wedges the classifier could learn from), then
    brightness (in [0, 1] pixel units, hence divided by ``std``) and contrast about the mean."""
    b = x.shape[0]

    def uniform(amplitude: float) -> torch.Tensor:
        return ((torch.rand(b, generator=generator) * 2 - 1) * amplitude).to(x.device)

    angle = uniform(math.radians(rotation_deg))
    zoom = 1.0 + uniform(scale)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of f image widths is 2f
    theta = torch.stack([torch.stack([cos, -sin, uniform(2 * translate)], 1),
                         torch.stack([sin, cos, uniform(2 * translate)], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    gain = (1.0 + uniform(contrast)).view(b, 1, 1, 1)
    shift = (uniform(brightness) / std).view(b, 1, 1, 1)
    return (x - mean) * gain + mean + shift


def make_loss(mode: str, class_weights: Sequence[float] | None, device: torch.device) -> nn.Module:
    """CE on class indices (weights per class) or BCE on multi-hot targets (pos_weight)."""
    weight = None if class_weights is None else torch.tensor(class_weights, device=device)
    if mode == "multiclass":
        return nn.CrossEntropyLoss(weight=weight)
    return nn.BCEWithLogitsLoss(pos_weight=weight)


def inverse_frequency_weights(counts: Sequence[int], mode: str, total: int) -> list[float]:
    """Multiclass: ``total / (K * n_c)`` (mean 1 on a balanced set); multilabel: ``pos_weight
    = negatives / positives`` per class. A class with no rows gets weight 0."""
    k = len(counts)
    if mode == "multiclass":
        return [total / (k * n) if n else 0.0 for n in counts]
    return [(total - n) / n if n else 0.0 for n in counts]


def read_history(uri: str, s3_endpoint: str | None = None) -> list[dict[str, Any]]:
    """The epochs ``metrics.jsonl`` holds (empty when there is none yet)."""
    loc = resolve(uri, s3_endpoint)
    if not loc.exists():
        return []
    return [json.loads(line) for line in loc.read_text().splitlines() if line.strip()]


def _evaluate(net: nn.Module, shard: Any, batch_size: int, classes: Sequence[str], mode: str,
              loss_fn: nn.Module, device: torch.device) -> dict[str, Any]:
    """Validation metrics over every rank's shard (gathered, so all ranks return the same)."""
    import torch.distributed as dist

    net.eval()
    parts: dict[str, list[np.ndarray]] = {"logits": [], "label": [], "targets": []}
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=batch_size, device=device):
            parts["logits"].append(net(batch["x"]).float().cpu().numpy())
            parts["label"].append(batch["label"].cpu().numpy())
            parts["targets"].append(batch["targets"].cpu().numpy())
    local = {k: np.concatenate(v) if v else np.zeros((0,) if k == "label" else (0, len(classes)))
             for k, v in parts.items()}
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        local = {k: np.concatenate([g[k] for g in gathered]) for k in local}
    logits = torch.from_numpy(local["logits"]).to(device)
    target = local["label"] if mode == "multiclass" else local["targets"]
    with torch.inference_mode():
        loss = float(loss_fn(logits, torch.from_numpy(target).to(device)))
    metrics = classification_metrics(local["logits"], local["label"], local["targets"], classes, mode)
    return {"val_loss": loss, "val_images": int(local["label"].size),
            **{f"val_{k}": v for k, v in metrics.items()}}


def _global_sum(*values: float) -> list[float]:
    """Sum scalars over the ranks (the identity on one worker)."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


#: Where a good classifier checkpoint comes from (for the refusal of a foreign one).
MADE_BY = "jobs/train_classifier.py (its run checkpoints)"


@dataclass
class _Training:
    """The networks and schedule a worker trains, and where a resumed run stands."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines so far


def _build_or_resume(config: ClassifierConfig, classes: Sequence[str], metrics_uri: str,
                     checkpoint: Any) -> _Training:
    """The same seed on every rank (DDP broadcasts rank 0's anyway); then, after a worker
    restart or when the same run name is started again, the checkpoint's state."""
    torch.manual_seed(config.seed)
    model = build_model(config, len(classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    training = _Training(model, optimizer, schedule)
    if checkpoint is None:
        return training
    with checkpoint.as_directory() as directory:
        state, _ = read_checkpoint(directory, made_by=MADE_BY)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    training.start_epoch = int(state["epoch"]) + 1
    training.history = [h for h in read_history(metrics_uri, config.s3_endpoint)
                        if h["epoch"] < training.start_epoch]
    return training


def _train_epoch(model: nn.Module, training: _Training, batches: Any, config: ClassifierConfig,
                 loss_fn: nn.Module, generator: torch.Generator) -> tuple[float, int]:
    """One pass over this rank's batches: ``(sum of losses, images)`` of this rank."""
    model.train()
    loss_sum, seen = 0.0, 0
    for step, batch in enumerate(batches):
        if config.max_steps_per_epoch is not None and step >= config.max_steps_per_epoch:
            break
        x = augment(batch["x"], generator, std=config.preprocessing.std) if config.augment else batch["x"]
        target = batch["label"] if config.mode == "multiclass" else batch["targets"]
        loss = loss_fn(model(x), target)
        training.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        training.optimizer.step()
        loss_sum += loss.item() * x.shape[0]
        seen += x.shape[0]
    return loss_sum, seen


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker: train, validate and report once per epoch."""
    import ray.train
    import ray.train.torch

    from cxrfactory.runtime import quiet_train_reports

    quiet_train_reports()
    config = ClassifierConfig.from_dict(loop_config["config"])
    classes = tuple(loop_config["classes"])
    metrics_uri = loop_config["metrics_uri"]
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = ray.train.torch.get_device()

    # Build, resume
    training = _build_or_resume(config, classes, metrics_uri, ray.train.get_checkpoint())

    # Distribute
    model = ray.train.torch.prepare_model(training.model)
    net = getattr(model, "module", model)  # the bare network: evaluation and checkpoints
    loss_fn = make_loss(config.mode, loop_config["class_weights"], device)
    generator = torch.Generator().manual_seed(config.seed * 7919 + rank)
    worker_batch = config.batch_size // world
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(training.start_epoch, config.epochs):
        # Train
        started = time.perf_counter()
        batches = train_shard.iter_torch_batches(batch_size=worker_batch, drop_last=True, device=device)
        loss_sum, seen = _train_epoch(model, training, batches, config, loss_fn, generator)
        lr = training.schedule.get_last_lr()[0]
        training.schedule.step()
        loss_sum, seen = _global_sum(loss_sum, seen)

        # Validate
        metrics = {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_images": int(seen),
                   "lr": lr, **_evaluate(net, val_shard, worker_batch, classes, config.mode,
                                         loss_fn, device)}
        metrics["epoch_seconds"] = time.perf_counter() - started  # training and validation

        # Report: every rank, once per epoch; rank 0 attaches the checkpoint and the metrics file
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            continue
        training.history.append(jsonable(metrics))
        resolve(metrics_uri, config.s3_endpoint).write_text(
            "".join(json.dumps(h) + "\n" for h in training.history))
        with tempfile.TemporaryDirectory() as directory:
            write_checkpoint(directory, {"model": net.state_dict(), "optimizer": training.optimizer.state_dict(),
                                         "schedule": training.schedule.state_dict(), "epoch": epoch},
                             {"config": config.to_dict(), "classes": list(classes), "epoch": epoch,
                              "metrics": jsonable(metrics)})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")

"""Deterministic per-image noise and batched generation for synthesis.

docs/architecture.md, "Seeds": every image's noise depends on its own seed alone, not on batch size, worker count or
order, so an image can be regenerated bit for bit from ``(generator, class, seed)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
from torch import Tensor, nn


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper, else itself."""
    return getattr(module, "module", module)


def noise_for_seeds(seeds: Sequence[int], z_dim: int) -> Tensor:
    """``(len(seeds), z_dim)`` float32 standard-normal noise on CPU; row i depends only on seeds[i].

    Each row comes from its own ``torch.Generator`` seeded with the image's seed (the CPU
    generator's stream is the same on every platform and device).
    """
    out = torch.empty(len(seeds), z_dim, dtype=torch.float32)
    gen = torch.Generator(device="cpu")
    for row, seed in enumerate(seeds):
        gen.manual_seed(int(seed))
        out[row] = torch.randn(z_dim, generator=gen, dtype=torch.float32)
    return out


@torch.no_grad()
def standing_statistics(generator: nn.Module, *, images: int, batch_size: int = 64,
                        seed: int = 0) -> None:
    """Recompute ``generator``'s BatchNorm running statistics from its own outputs, in place.

    BigGAN's "standing statistics": every BatchNorm's running mean and variance are reset and
    then averaged (equal weight per batch, ``momentum=None``) over ``images // batch_size``
    train-mode forward passes of fresh noise and class-balanced one-hot conditions. An
    averaged generator (G_ema) otherwise runs with the statistics of the live G, which belong
    to other weights. Deterministic for a given ``seed``; the caller's RNG streams are untouched.
    """
    net = unwrap(generator)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    if batch_size < 2 or images < batch_size:
        raise ValueError(f"standing statistics need batches of >= 2 images and at least one "
                         f"batch, got images={images}, batch_size={batch_size}")
    device = next(net.parameters()).device
    rng = torch.Generator(device=device).manual_seed(seed)
    momenta = [m.momentum for m in norms]
    was_training = net.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
    net.train()
    try:
        for b in range(images // batch_size):
            labels = torch.arange(b * batch_size, (b + 1) * batch_size, device=device) % net.num_classes
            z = torch.randn(batch_size, net.z_dim, generator=rng, device=device)
            net(z, torch.nn.functional.one_hot(labels, net.num_classes).float())
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        net.train(was_training)


def to_uint8(images: Tensor) -> np.ndarray:
    """Images in [-1, 1], ``(B, 1, H, W)`` -> uint8 ``(B, H, W)`` (x+1)*127.5 rounded, clipped."""
    assert images.ndim == 4 and images.shape[1] == 1, f"expected (B, 1, H, W), got {tuple(images.shape)}"
    scaled = ((images.float() + 1.0) * 127.5).round().clamp_(0, 255)
    return scaled[:, 0].to(torch.uint8).cpu().numpy()


@torch.inference_mode()
def generate(
    generator: nn.Module,
    class_indices: Sequence[int],
    seeds: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    bf16: bool = False,
) -> np.ndarray:
    """The last branch's images for ``(class, seed)`` pairs -> uint8 ``(N, H, W)``.

    The generator runs in eval mode (BatchNorm uses its running statistics, so an image does
    not depend on the rest of its batch). ``bf16`` autocasts on CUDA for throughput; the
    default float32 keeps PNG bytes reproducible.
    """
    if len(class_indices) != len(seeds):
        raise ValueError(f"{len(class_indices)} class indices but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    net = unwrap(generator)
    num_classes, z_dim = net.num_classes, net.z_dim
    labels = torch.as_tensor(np.asarray(class_indices, dtype=np.int64))
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class index out of range [0, {num_classes}): {labels.tolist()}")
    device = torch.device(device)
    was_training = net.training
    net.eval()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else nullcontext()
    )
    chunks = []
    try:
        for start in range(0, len(seeds), batch_size):
            z = noise_for_seeds(seeds[start : start + batch_size], z_dim).to(device)
            c = torch.nn.functional.one_hot(labels[start : start + batch_size], num_classes).float().to(device)
            with autocast:
                images = net(z, c)[-1]
            chunks.append(to_uint8(images))
    finally:
        net.train(was_training)
    if not chunks:
        res = net.resolutions[-1]
        return np.zeros((0, res, res), dtype=np.uint8)
    return np.concatenate(chunks)

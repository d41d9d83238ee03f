"""Building blocks shared by the generator and the discriminators.

Every block takes explicit ``in_channels`` / ``out_channels`` (StackGAN++ naming kept in
comments), so the networks above only compute channel tables. Generator blocks use BatchNorm +
GLU as StackGAN++ does; discriminator blocks use spectral normalisation and LeakyReLU 0.2 and no
BatchNorm (normalising statistics across the real and the fake half of a D step would leak one
into the other, and SN already bounds the discriminator).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


def conv3x3(in_channels: int, out_channels: int, *, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with 'same' padding."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class GLU(nn.Module):
    """Gated linear unit over channels: the first half gated by the sigmoid of the second."""

    def forward(self, x: Tensor) -> Tensor:
        assert x.shape[1] % 2 == 0, f"GLU needs an even channel count, got {x.shape[1]}"
        a, b = x.chunk(2, dim=1)
        return a * torch.sigmoid(b)


class ConvGLU(nn.Sequential):
    """3x3 conv -> BatchNorm -> GLU (StackGAN++ ``Block3x3_relu``); the join layer of a branch."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            conv3x3(in_channels, out_channels * 2),
            nn.BatchNorm2d(out_channels * 2),
            GLU(),
        )


class UpBlock(nn.Sequential):
    """Nearest-neighbour x2 -> 3x3 conv -> BatchNorm -> GLU (StackGAN++ ``upBlock``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            conv3x3(in_channels, out_channels * 2),
            nn.BatchNorm2d(out_channels * 2),
            GLU(),
        )


class ResBlock(nn.Module):
    """StackGAN++ residual block: conv-BN-GLU-conv-BN plus the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(channels, channels * 2),
            nn.BatchNorm2d(channels * 2),
            GLU(),
            conv3x3(channels, channels),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ToImage(nn.Sequential):
    """3x3 conv -> tanh: a branch's features to an image in [-1, 1]."""

    def __init__(self, in_channels: int, image_channels: int) -> None:
        super().__init__(conv3x3(in_channels, image_channels, bias=True), nn.Tanh())


def tile_condition(c: Tensor, like: Tensor) -> Tensor:
    """Broadcast a condition ``(B, K)`` over the spatial size of ``like`` -> ``(B, K, H, W)``."""
    return c[:, :, None, None].expand(-1, -1, like.shape[2], like.shape[3]).to(like.dtype)


class SelfAttention(nn.Module):
    """SAGAN self-attention with the paper's scheduled scale tau.

    ``y = x + tau * gamma * o`` where ``o`` is attention over all positions with queries and keys
    projected to ``C/8`` channels and values kept at ``C`` (SAGAN). ``tau`` is a persistent
    buffer set from outside by the trainer's schedule (0, +0.1 every 5 epochs, at most 1), so it
    travels with every state dict, including the EMA generator's and the artifact's.
    ``gamma`` is SAGAN's learnable gain, initialised to 1 (not SAGAN's 0) so that at its start
    the block is exactly the paper's ``x + tau * o``; the network may then shrink or grow it.
    With ``learnable_gain=False`` gamma is absent and the block is ``x + tau * o``.

    The attention runs through ``F.scaled_dot_product_attention`` with one head, so fused
    kernels avoid the N x N map (N = H*W: 4096 positions at 64 px are 64 MiB per image in
    float32). SAGAN's logits are unscaled dot products, hence ``scale=1.0``.
    """

    def __init__(self, channels: int, *, learnable_gain: bool = True) -> None:
        super().__init__()
        assert channels >= 8, f"self-attention needs >= 8 channels, got {channels}"
        self.query = nn.Conv2d(channels, channels // 8, 1)
        self.key = nn.Conv2d(channels, channels // 8, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.ones(())) if learnable_gain else None
        self.register_buffer("tau", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C/8)
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C/8)
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, N, C)
        o = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # (B, 1, N, C)
        o = o.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        # Computed even while tau is 0, so every parameter takes part in every step (DDP
        # without find_unused_parameters expects a gradient for each, zero or not).
        scale = self.tau if self.gamma is None else self.tau * self.gamma
        return x + scale.to(o.dtype) * o


def sn_conv(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int) -> nn.Module:
    """Spectrally normalised convolution."""
    return spectral_norm(nn.Conv2d(in_channels, out_channels, kernel, stride, padding))


class DownBlock(nn.Sequential):
    """SN 4x4 stride-2 conv -> LeakyReLU 0.2: halves the side (StackGAN++ ``downBlock``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(sn_conv(in_channels, out_channels, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True))


class SNConvLeaky(nn.Sequential):
    """SN 3x3 conv -> LeakyReLU 0.2 (StackGAN++ ``Block3x3_leakRelu``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(sn_conv(in_channels, out_channels, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True))

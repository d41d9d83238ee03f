"""Building blocks shared by the generator and the discriminators.

Every block takes explicit ``in_channels`` / ``out_channels`` (StackGAN++ naming kept in
comments), so the networks above only compute channel tables. Generator blocks use BatchNorm +
GLU as StackGAN++ does; discriminator blocks use spectral normalisation and LeakyReLU 0.2 and no
BatchNorm (normalising statistics across the real and the fake half of a D step would leak one
into the other, and SN already bounds the discriminator).

Generator blocks given ``num_classes`` use class-conditional BatchNorm (SAGAN, BigGAN) instead:
the label then sets every normalisation's gain and bias, so it reaches every layer rather than
only the input. Such blocks take the condition as a second argument (``block(x, c)``); blocks
built without it take and ignore it, so the networks call them the same way either way.
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


class ConditionalBatchNorm(nn.Module):
    """BatchNorm whose gain and bias are looked up by class: ``bn(x) * (1 + g[c]) + b[c]``.

    SAGAN/BigGAN's conditional BatchNorm for a one-hot ``c`` (a linear map of a one-hot is a
    table lookup). The normalisation itself is a plain affine-free BatchNorm kept as the child
    ``bn``, so what handles BatchNorms (standing statistics, ``SyncBatchNorm`` conversion) finds
    and handles it. ``g`` and ``b`` start at zero: at initialisation this is BatchNorm with gain
    1 and bias 0, and the label's effect is learned from there. ``dims`` 1 for ``(B, C)``
    inputs, 2 for ``(B, C, H, W)``.
    """

    takes_condition = True

    def __init__(self, num_features: int, num_classes: int, *, dims: int = 2) -> None:
        super().__init__()
        assert dims in (1, 2), f"dims must be 1 or 2, got {dims}"
        self.bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(num_features, affine=False)
        self.gain = nn.Linear(num_classes, num_features, bias=False)  # one row per class: gain - 1
        self.bias = nn.Linear(num_classes, num_features, bias=False)
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        assert c is not None, "conditional BatchNorm needs the condition c"
        shape = (x.shape[0], -1) + (1,) * (x.ndim - 2)
        c = c.to(x.dtype)
        return self.bn(x) * (1 + self.gain(c).view(shape)) + self.bias(c).view(shape)


def batch_norm(num_features: int, num_classes: int | None = None, *, dims: int = 2) -> nn.Module:
    """BatchNorm, or :class:`ConditionalBatchNorm` when ``num_classes`` is given."""
    if num_classes is not None:
        return ConditionalBatchNorm(num_features, num_classes, dims=dims)
    return (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(num_features)


class LocalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm of any input rank: what a ``SyncBatchNorm`` becomes off the process group.

    ``SyncBatchNorm.convert_sync_batchnorm`` forgets whether it replaced a 1d or a 2d
    BatchNorm, so the way back accepts both (the computation is the same).
    """

    def _check_input_dim(self, input: Tensor) -> None:  # noqa: A002
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")


def local_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``SyncBatchNorm`` replaced by a :class:`LocalBatchNorm`, in place.

    Parameters and buffers carry over under the same names, so state dicts are unchanged. The
    averaged generator needs this: it is evaluated and given standing statistics on one rank,
    where a ``SyncBatchNorm`` would wait for the others.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, nn.SyncBatchNorm):
            tensors = [*child.parameters(), *child.buffers()]
            local = LocalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats,
                                   device=tensors[0].device if tensors else None)
            local.load_state_dict(child.state_dict())
            local.train(child.training)
            if child.affine:
                local.weight.requires_grad_(child.weight.requires_grad)
                local.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, local)
        else:
            local_batchnorm(child)
    return module


class CondSequential(nn.Sequential):
    """``nn.Sequential`` that passes the condition to the members that take one.

    Keeps ``nn.Sequential``'s child names (``0``, ``1``, ...), so state dicts of networks built
    without conditional BatchNorm are the same as before it existed.
    """

    takes_condition = True

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:  # type: ignore[override]
        for module in self:
            x = module(x, c) if getattr(module, "takes_condition", False) else module(x)
        return x


class ConvGLU(CondSequential):
    """3x3 conv -> BatchNorm -> GLU (StackGAN++ ``Block3x3_relu``); the join layer of a branch."""

    def __init__(self, in_channels: int, out_channels: int, *, num_classes: int | None = None) -> None:
        super().__init__(
            conv3x3(in_channels, out_channels * 2),
            batch_norm(out_channels * 2, num_classes),
            GLU(),
        )


class UpBlock(CondSequential):
    """Nearest-neighbour x2 -> 3x3 conv -> BatchNorm -> GLU (StackGAN++ ``upBlock``)."""

    def __init__(self, in_channels: int, out_channels: int, *, num_classes: int | None = None) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            conv3x3(in_channels, out_channels * 2),
            batch_norm(out_channels * 2, num_classes),
            GLU(),
        )


class ResBlock(nn.Module):
    """StackGAN++ residual block: conv-BN-GLU-conv-BN plus the identity."""

    takes_condition = True

    def __init__(self, channels: int, *, num_classes: int | None = None) -> None:
        super().__init__()
        self.body = CondSequential(
            conv3x3(channels, channels * 2),
            batch_norm(channels * 2, num_classes),
            GLU(),
            conv3x3(channels, channels),
            batch_norm(channels, num_classes),
        )

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        return x + self.body(x, c)


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

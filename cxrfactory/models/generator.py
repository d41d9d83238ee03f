"""Multi-scale conditional generator (StackGAN++ tree with self-attention, Ann et al. 2020).

Reading of the paper's conditioning: "the condition takes the place of part of the latent
vector". StackGAN++ feeds its first stage ``[z, c_code]`` where ``c_code`` is a text embedding
passed through conditioning augmentation; a class label is discrete, so the one-hot ``c``
takes that slot directly: the input is ``[c, z]`` (``len(classes) + z_dim`` entries), with no
conditioning augmentation. As in StackGAN++, ``c`` is also joined into every later branch
(tiled over the feature map and concatenated before the branch's 3x3 join conv).
With ``model.generator_norm: conditional`` every BatchNorm's gain and bias also depend on ``c``
(class-conditional BatchNorm, SAGAN/BigGAN), a label signal in every layer.

Channel table (``ngf`` = width at the first branch's output, ``u = log2(base/4)`` up-blocks):

    branch 1: [c, z] -> linear -> (ngf*2**u, 4, 4) -> u up-blocks -> (ngf, base, base)
              -> self-attention -> image(base)
    branch i: join(features_{i-1} ++ tile(c)) -> num_residual res-blocks -> up-block
              -> (ngf / 2**(i-1), base*2**(i-1), ...) -> image

For the paper (ngf 64, base 64): 1024 ch at 4x4, 64 ch at 64 px, 32 at 128 px, 16 at 256 px,
exactly StackGAN++'s widths.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cxrfactory.models.config import ModelConfig
from cxrfactory.models.layers import (
    GLU, CondSequential, ConvGLU, ResBlock, SelfAttention, ToImage, UpBlock, batch_norm, tile_condition,
)
from cxrfactory.models.weight_init import initialise


class _FirstBranch(nn.Module):
    """[c, z] -> 4x4 features -> up-blocks -> optional self-attention: (B, ngf, base, base)."""

    def __init__(self, in_dim: int, ngf: int, base_resolution: int, *, attention: bool, attention_gain: bool,
                 norm_classes: int | None = None) -> None:
        super().__init__()
        num_up = int(math.log2(base_resolution // 4))
        widths = [ngf * 2 ** (num_up - i) for i in range(num_up + 1)]  # 4x4 ... base
        self.init_channels = widths[0]
        # Linear + BatchNorm1d + GLU as StackGAN++'s INIT_STAGE_G.fc (2x width, GLU halves it).
        self.fc = CondSequential(
            nn.Linear(in_dim, widths[0] * 4 * 4 * 2, bias=False),
            batch_norm(widths[0] * 4 * 4 * 2, norm_classes, dims=1),
            GLU(),
        )
        self.up = CondSequential(*[UpBlock(widths[i], widths[i + 1], num_classes=norm_classes)
                                   for i in range(num_up)])
        self.attention = SelfAttention(ngf, learnable_gain=attention_gain) if attention else None

    def forward(self, latent: Tensor, c: Tensor) -> Tensor:
        h = self.fc(latent, c).view(latent.shape[0], self.init_channels, 4, 4)
        h = self.up(h, c)
        return h if self.attention is None else self.attention(h)


class _NextBranch(nn.Module):
    """Join the condition, refine, double the side: (B, C, S, S) -> (B, C/2, 2S, 2S)."""

    def __init__(self, in_channels: int, num_classes: int, num_residual: int, *,
                 norm_classes: int | None = None) -> None:
        super().__init__()
        self.join = ConvGLU(in_channels + num_classes, in_channels, num_classes=norm_classes)
        self.residual = CondSequential(*[ResBlock(in_channels, num_classes=norm_classes)
                                         for _ in range(num_residual)])
        self.up = UpBlock(in_channels, in_channels // 2, num_classes=norm_classes)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        h = self.join(torch.cat([h, tile_condition(c, h)], dim=1), c)
        return self.up(self.residual(h, c), c)


class MultiScaleGenerator(nn.Module):
    """``G(z, c)`` -> one image per branch, low to high resolution, each ``(B, channels, S, S)``.

    ``z``: ``(B, z_dim)`` noise; ``c``: ``(B, num_classes)`` one-hot condition. Images are in
    [-1, 1]. The attention scale is set with :meth:`set_tau` (a buffer, saved in the state dict).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.arch == "stackgan", f"MultiScaleGenerator builds arch 'stackgan', got {config.arch!r}"
        self.z_dim = config.z_dim
        self.num_classes = config.num_classes
        self.resolutions = config.branch_resolutions
        widths = [config.ngf // 2**i for i in range(config.num_branches)]  # features of each branch
        norm_classes = config.num_classes if config.generator_norm == "conditional" else None
        self.first = _FirstBranch(
            config.num_classes + config.z_dim, config.ngf, config.base_resolution,
            attention=config.attention, attention_gain=config.attention_gain, norm_classes=norm_classes,
        )
        self.later = nn.ModuleList(
            [_NextBranch(widths[i - 1], config.num_classes, config.num_residual, norm_classes=norm_classes)
             for i in range(1, config.num_branches)]
        )
        self.to_image = nn.ModuleList([ToImage(w, config.channels) for w in widths])
        initialise(self, config.init)

    def set_tau(self, tau: float) -> None:
        """Set the self-attention output scale (no-op without attention)."""
        if self.first.attention is not None:
            self.first.attention.tau.fill_(float(tau))

    @property
    def tau(self) -> float:
        return 0.0 if self.first.attention is None else float(self.first.attention.tau)

    def forward(self, z: Tensor, c: Tensor) -> list[Tensor]:
        assert z.ndim == 2 and z.shape[1] == self.z_dim, f"z must be (B, {self.z_dim}), got {tuple(z.shape)}"
        assert c.shape == (z.shape[0], self.num_classes), (
            f"c must be (B, {self.num_classes}) one-hot, got {tuple(c.shape)}"
        )
        c = c.to(z.dtype)
        h = self.first(torch.cat([c, z], dim=1), c)
        images = [self.to_image[0](h)]
        for branch, to_image in zip(self.later, self.to_image[1:]):
            h = branch(h, c)
            images.append(to_image(h))
        return images

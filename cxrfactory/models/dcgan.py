"""Conditional DCGAN baseline: one network straight to the top resolution.

The paper compares against a DCGAN that makes 256 px chest X-rays in one network (Salehinejad et
al.). This generator follows DCGAN (Radford et al.): ``[c, z]`` -> linear -> 4x4 -> stride-2
4x4 transposed convolutions with BatchNorm + ReLU, halving the width each time, -> tanh. The
condition enters only at the input (Mirza & Osindero's cGAN). Widths are capped at ``16 ngf`` so
the 256 px net (six up-sampling steps) stays near the multi-scale generator's size. The config's
``generator_norm`` and ``init`` apply here as in the multi-scale generator, so a comparison
under conditional BatchNorm still differs in the architecture alone.

It exposes the same interface as :class:`~cxrfactory.models.generator.MultiScaleGenerator`
(``G(z, c)`` -> a list of images, here of length 1; ``set_tau`` a no-op), and it is trained
against the same spectrally normalised conditional discriminator at its resolution, through the
same losses and step object, so the comparison isolates the generator's design.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cxrfactory.models.config import ModelConfig
from cxrfactory.models.layers import CondSequential, batch_norm
from cxrfactory.models.weight_init import initialise


def _up(in_channels: int, out_channels: int, norm_classes: int | None) -> CondSequential:
    """DCGAN up-sampling step: 4x4 stride-2 transposed conv -> BatchNorm -> ReLU."""
    return CondSequential(
        nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=False),
        batch_norm(out_channels, norm_classes),
        nn.ReLU(inplace=True),
    )


class ConditionalDCGANGenerator(nn.Module):
    """``G(z, c)`` -> ``[image]`` with image ``(B, channels, R, R)``, R = ``config.resolution``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.arch == "cdcgan", f"ConditionalDCGANGenerator builds arch 'cdcgan', got {config.arch!r}"
        self.z_dim = config.z_dim
        self.num_classes = config.num_classes
        self.resolutions = config.branch_resolutions
        num_up = int(math.log2(config.resolution // 4))
        # Features at 4x4, 8x8, ... up to R/2; the last step makes the image itself.
        widths = [min(config.ngf * 2 ** (num_up - 1 - i), config.ngf * 16) for i in range(num_up)]
        self.init_channels = widths[0]
        norm_classes = config.num_classes if config.generator_norm == "conditional" else None
        self.fc = CondSequential(
            nn.Linear(config.num_classes + config.z_dim, widths[0] * 4 * 4, bias=False),
            batch_norm(widths[0] * 4 * 4, norm_classes, dims=1),
            nn.ReLU(inplace=True),
        )
        self.up = CondSequential(*[_up(widths[i], widths[i + 1], norm_classes) for i in range(num_up - 1)])
        self.to_image = nn.Sequential(nn.ConvTranspose2d(widths[-1], config.channels, 4, 2, 1), nn.Tanh())
        initialise(self, config.init)

    def set_tau(self, tau: float) -> None:
        """No attention in the baseline: the schedule does not apply."""

    @property
    def tau(self) -> float:
        return 0.0

    def forward(self, z: Tensor, c: Tensor) -> list[Tensor]:
        assert z.ndim == 2 and z.shape[1] == self.z_dim, f"z must be (B, {self.z_dim}), got {tuple(z.shape)}"
        assert c.shape == (z.shape[0], self.num_classes), (
            f"c must be (B, {self.num_classes}) one-hot, got {tuple(c.shape)}"
        )
        c = c.to(z.dtype)
        h = self.fc(torch.cat([c, z], dim=1), c).view(z.shape[0], self.init_channels, 4, 4)
        return [self.to_image(self.up(h, c))]

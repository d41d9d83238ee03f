"""Per-branch discriminators (StackGAN++ ``D_NET64/128/256``, with spectral normalisation).

One discriminator per generator branch. Each encodes its image with 4x4 stride-2 down-blocks
to a 4x4 map (channels ``ndf, 2 ndf, 4 ndf, ...``), squeezes channels above ``8 ndf`` back with
3x3 blocks (StackGAN++'s 128/256 px nets do the same), then scores with two heads:

- unconditional: 4x4 conv on the 4x4 map -> "is this a real X-ray";
- conditional, ``condition="concat"`` (the paper): the condition tiled over the 4x4 map and
  concatenated, 3x3 block, 4x4 conv -> "is this a real X-ray of class c";
- conditional, ``condition="projection"`` (Miyato & Koyama 2018): a 4x4 conv on the 4x4 map plus
  the inner product of a learned class embedding with the sum-pooled map,
  ``psi(h) + <embed(c), sum h>``. The label then scales the very features the score is made
  of, instead of being one more input the head may learn to ignore.

The conditional head can also score images again under other conditions (``mismatched``):
StackGAN++'s "wrong" pairs, real images with a label they do not have, which teach the head
to look at the condition (see ``training.losses``). They reuse the encoding, so they cost only
the small head.

Every conv carries spectral normalisation; activations are LeakyReLU 0.2; there is no sigmoid,
the scores are raw (LSGAN) and there is no BatchNorm (see ``layers``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cxrfactory.models.config import ModelConfig
from torch.nn.utils.parametrizations import spectral_norm

from cxrfactory.models.layers import DownBlock, SNConvLeaky, sn_conv, tile_condition
from cxrfactory.models.weight_init import initialise


class Discriminator(nn.Module):
    """``D(x, c)`` -> ``(uncond, cond)`` raw scores, each ``(B,)``.

    ``x``: ``(B, channels, resolution, resolution)`` in [-1, 1]; ``c``: ``(B, num_classes)``.
    ``D(x, c, mismatched=m)`` with ``m`` ``(M, num_classes)``, ``M <= B``, also scores the first
    ``M`` images under the conditions ``m``; those ``M`` scores follow the ``B`` in ``cond``.
    """

    def __init__(self, resolution: int, *, ndf: int, num_classes: int, channels: int = 1,
                 condition: str = "concat") -> None:
        super().__init__()
        assert condition in ("concat", "projection"), f"unknown condition {condition!r}"
        assert resolution >= 8 and resolution & (resolution - 1) == 0, f"bad resolution {resolution}"
        self.resolution = resolution
        self.channels = channels
        self.num_classes = num_classes
        num_down = int(math.log2(resolution // 4))
        widths = [ndf * 2**i for i in range(num_down)]  # after each down-block
        blocks: list[nn.Module] = [DownBlock(channels, widths[0])]
        blocks += [DownBlock(widths[i - 1], widths[i]) for i in range(1, num_down)]
        width = widths[-1]
        while width > ndf * 8:  # 128 px: 16 ndf -> 8 ndf; 256 px: 32 -> 16 -> 8 ndf
            blocks.append(SNConvLeaky(width, width // 2))
            width //= 2
        self.encode = nn.Sequential(*blocks)
        self.features = width
        self.condition = condition
        self.uncond_head = sn_conv(width, 1, 4, 4, 0)
        if condition == "concat":
            self.cond_join = SNConvLeaky(width + num_classes, width)
        else:  # one embedding row per class, spectrally normalised as in Miyato & Koyama's code
            self.embed = spectral_norm(nn.Linear(num_classes, width, bias=False))
        self.cond_head = sn_conv(width, 1, 4, 4, 0)

    def forward(self, x: Tensor, c: Tensor, mismatched: Tensor | None = None) -> tuple[Tensor, Tensor]:
        assert x.shape[1:] == (self.channels, self.resolution, self.resolution), (
            f"D expects (B, {self.channels}, {self.resolution}, {self.resolution}), got {tuple(x.shape)}"
        )
        assert c.shape == (x.shape[0], self.num_classes), f"c must be (B, {self.num_classes}), got {tuple(c.shape)}"
        h = self.encode(x)  # (B, features, 4, 4)
        uncond = self.uncond_head(h).flatten()
        if mismatched is not None:
            m = mismatched.shape[0]
            assert mismatched.shape == (m, self.num_classes) and m <= x.shape[0], (
                f"mismatched must be (M <= {x.shape[0]}, {self.num_classes}), got {tuple(mismatched.shape)}"
            )
            h, c = torch.cat([h, h[:m]]), torch.cat([c, mismatched.to(c.dtype)])
        if self.condition == "projection":
            projection = (self.embed(c.to(h.dtype)) * h.sum(dim=(2, 3))).sum(dim=1)
            cond = self.cond_head(h).flatten() + projection
        else:
            cond = self.cond_head(self.cond_join(torch.cat([h, tile_condition(c, h)], dim=1))).flatten()
        return uncond, cond


def discriminators_for(config: ModelConfig) -> list[Discriminator]:
    """One discriminator per generator output, low to high resolution."""
    nets = [
        Discriminator(r, ndf=config.ndf, num_classes=config.num_classes, channels=config.channels,
                      condition=config.discriminator_condition)
        for r in config.branch_resolutions
    ]
    for net in nets:
        initialise(net, config.init)
    return nets

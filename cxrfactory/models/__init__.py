"""Networks: the multi-scale generator, per-branch discriminators, the cDCGAN baseline.

Public API::

    G = build_generator("paper")            # or a run Config / ModelConfig / YAML path
    images = G(z, c)                        # list, one (B, 1, S, S) per branch, low to high
    Ds = build_discriminators("paper")      # one per branch
    uncond, cond = Ds[0](images[0], c)      # raw LSGAN scores, (B,) each

Imports no Ray (docs/architecture.md, "Layers"); the DenseNet feature extractor lives in ``models.densenet``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from cxrfactory.models.config import ModelConfig, model_config
from cxrfactory.models.dcgan import ConditionalDCGANGenerator
from cxrfactory.models.discriminator import Discriminator, discriminators_for
from cxrfactory.models.generator import MultiScaleGenerator
from cxrfactory.models.sampling import generate, noise_for_seeds, to_uint8, unwrap

__all__ = [
    "ConditionalDCGANGenerator",
    "Discriminator",
    "MultiScaleGenerator",
    "build_discriminators",
    "build_generator",
    "count_parameters",
    "generate",
    "noise_for_seeds",
    "to_uint8",
    "unwrap",
]


def build_generator(config_or_preset: ModelConfig | Any | str | Path) -> nn.Module:
    """The generator the config's ``model.arch`` names: ``G(z, c)`` -> list of images, low to high.

    Takes a :class:`ModelConfig`, a run config with a ``model`` section, a GAN preset name or a
    YAML/JSON file (:func:`cxrfactory.models.config.model_config`).
    """
    model = model_config(config_or_preset)
    if model.arch == "cdcgan":
        return ConditionalDCGANGenerator(model)
    return MultiScaleGenerator(model)


def build_discriminators(config_or_preset: ModelConfig | Any | str | Path) -> list[Discriminator]:
    """One discriminator per generator output: ``D(x, c)`` -> ``(uncond, cond)`` raw scores."""
    return discriminators_for(model_config(config_or_preset))


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (spectral-norm parametrisations count their original weight once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

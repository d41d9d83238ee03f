"""The GAN networks' architecture config: what the generator and discriminators are built from.

:class:`ModelConfig` is the ``model`` section of a GAN run's config
(:class:`cxrfactory.gan.config.Config`); it lives here so the networks need nothing above them.
:func:`model_config` accepts what :func:`cxrfactory.models.build_generator` accepts: a
ModelConfig, a run config (anything with a ``model`` section), a GAN preset name or a YAML/JSON
file (of which only the ``model`` section is read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrfactory.config import ConfigError, from_dict, preset_or_file_data
from cxrfactory.labels import DEFAULT_CLASSES, validate_classes

#: The GAN architectures ``model.arch`` names.
GAN_ARCHITECTURES = ("stackgan", "cdcgan")

#: How the generator's BatchNorms treat the label (``model.generator_norm``).
GENERATOR_NORMS = ("batchnorm", "conditional")

#: How the discriminators' conditional heads read the label (``model.discriminator_condition``).
DISCRIMINATOR_CONDITIONS = ("concat", "projection")

#: Weight initialisations (``model.init``).
INITS = ("pytorch", "stackgan")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class ModelConfig:
    """Generator and discriminator architecture."""

    arch: str = "stackgan"  # "stackgan": multi-scale G with one D per branch (the paper); "cdcgan": one network to the top resolution (the paper's baseline)
    classes: tuple[str, ...] = DEFAULT_CLASSES  # condition vocabulary, in vocabulary order; the one-hot condition has len(classes) entries
    z_dim: int = 100  # noise entries of the generator input; the full input is [one-hot c, z] (c fills the slot StackGAN++ gives its text code)
    ngf: int = 64  # generator width: channels at the first branch's output; 4x4 stage has ngf * 2**up_blocks (1024 for the paper)
    ndf: int = 64  # discriminator width: channels after its first down-block (doubles per down-block, StackGAN++)
    num_branches: int = 3  # generator branches (= discriminators), each doubling the resolution
    base_resolution: int = 64  # first branch's output side in pixels (power of two >= 8)
    num_residual: int = 2  # residual blocks per later branch
    attention: bool = True  # self-attention after the first branch's up-blocks
    attention_gain: bool = False  # a learnable SAGAN gain gamma (init 1) multiplies tau * attention; False: tau alone (the paper)
    channels: int = 1  # image channels (X-rays are grayscale)
    generator_norm: str = "batchnorm"  # "batchnorm": the label enters at the input and each later branch's join (the paper); "conditional": every BatchNorm's gain and bias are per class too (SAGAN/BigGAN)
    discriminator_condition: str = "concat"  # "concat": the one-hot tiled and joined to D's last features (the paper); "projection": inner product of a class embedding with D's pooled features (Miyato & Koyama 2018)
    init: str = "pytorch"  # "pytorch": PyTorch's default initialisation; "stackgan": StackGAN++'s (orthogonal conv and linear weights, BatchNorm gains N(1, 0.02))

    def __post_init__(self) -> None:
        if self.arch not in GAN_ARCHITECTURES:
            raise ConfigError(f"model.arch must be one of {GAN_ARCHITECTURES}, got {self.arch!r}")
        for name, allowed in (("generator_norm", GENERATOR_NORMS),
                              ("discriminator_condition", DISCRIMINATOR_CONDITIONS), ("init", INITS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} must be one of {', '.join(allowed)}, "
                                  f"got {getattr(self, name)!r}")
        try:
            classes = validate_classes(self.classes)
        except ValueError as err:
            raise ConfigError(f"model.classes: {err}") from None
        object.__setattr__(self, "classes", classes)
        for name in ("z_dim", "ngf", "ndf", "num_branches", "channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_residual < 0:
            raise ConfigError(f"model.num_residual must be >= 0, got {self.num_residual}")
        if not _is_power_of_two(self.base_resolution) or self.base_resolution < 8:
            raise ConfigError(
                f"model.base_resolution must be a power of two >= 8, got {self.base_resolution}"
            )
        # Each later branch halves the width (StackGAN++); the last one still needs channels.
        if self.arch == "stackgan" and self.ngf % 2 ** (self.num_branches - 1):
            raise ConfigError(
                f"model.ngf={self.ngf} must be divisible by 2**(num_branches-1)="
                f"{2 ** (self.num_branches - 1)}: each later branch halves the width"
            )
        if self.attention and self.ngf < 8:
            raise ConfigError("model.ngf must be >= 8 with attention (queries/keys have ngf/8 channels)")

    @property
    def num_classes(self) -> int:
        """Size of the one-hot condition."""
        return len(self.classes)

    @property
    def resolution(self) -> int:
        """Side of the final (highest-resolution) image."""
        return self.base_resolution * 2 ** (self.num_branches - 1)

    @property
    def branch_resolutions(self) -> list[int]:
        """Output side of every generator output, low to high (one per discriminator)."""
        if self.arch == "cdcgan":
            return [self.resolution]
        return [self.base_resolution * 2**i for i in range(self.num_branches)]


def model_config(config_or_preset: Any) -> ModelConfig:
    """A ModelConfig from itself, a run config's ``model`` section, a GAN preset or a file."""
    if isinstance(config_or_preset, ModelConfig):
        return config_or_preset
    if isinstance(getattr(config_or_preset, "model", None), ModelConfig):
        return config_or_preset.model
    if isinstance(config_or_preset, (str, Path)):
        # The whole file is checked when a run loads it (cxrfactory.gan.config); the networks
        # read only their own section, so they need nothing above them.
        data = preset_or_file_data("gan", config_or_preset)
        return from_dict(ModelConfig, data.get("model") or {}, "model.")
    raise ConfigError(f"expected a ModelConfig, a run config, a preset name or a file, "
                      f"got {type(config_or_preset).__name__}")

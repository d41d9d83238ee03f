"""A GAN run's typed config: model, GAN optimisation and training, with YAML presets.

A run is described by one :class:`Config` (``model``, ``gan``, ``train``). Presets live in
``cxrfactory/configs/gan/`` (``paper``: Ann et al. 2020 exactly; ``demo``: small and fast enough
to learn on a 2-core CPU; ``smoke``: a partial overlay, a tiny model for two steps, that
``jobs/train.py --smoke`` applies on top of the chosen preset). The resolved config is saved
with every checkpoint and artifact via :meth:`Config.to_dict`; :meth:`Config.from_dict` reads it
back strictly (an unknown key is an error, never silently ignored), so a typo in a YAML file or
an override fails loudly.

Overrides use dotted keys: ``cfg.with_overrides({"model.ngf": 32, "gan.lr_g": 1e-4})``, or from
a command line ``cfg.with_overrides(parse_overrides(["model.ngf=32"]))``. No Ray here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrfactory import config as _config
from cxrfactory.config import ConfigError, parse_overrides  # noqa: F401  (re-exported for callers)
from cxrfactory.models.config import GAN_ARCHITECTURES, ModelConfig  # noqa: F401

#: The preset kind (folder under cxrfactory/configs/) of GAN runs.
KIND = "gan"

#: Where G_ema's BatchNorm statistics come from (GANConfig.ema_batchnorm).
EMA_BATCHNORM = ("copy", "standing")


@dataclass(frozen=True)
class GANConfig:
    """Adversarial optimisation: LSGAN constants, D/G alternation, Adam, EMA, tau schedule."""

    lr_g: float = 2e-5  # generator Adam learning rate
    lr_d: float = 2e-5  # discriminator Adam learning rate
    betas: tuple[float, float] = (0.5, 0.999)  # Adam (beta1, beta2) for both networks
    d_steps_per_g: int = 5  # discriminator updates (each on a fresh real batch) per generator update
    loss_a: float = 0.0  # LSGAN target of D for fakes (paper eq. 5, "a")
    loss_b: float = 1.0  # LSGAN target of D for reals (paper eq. 5, "b")
    loss_d: float = 1.0  # value G wants D to give fakes (paper eq. 6, "d")
    mismatch_weight: float = 0.0  # weight of StackGAN++'s mismatched pairs (real image, wrong class) in D's conditional term; 0 = eq. 5 as printed
    ema_half_life_images: float = 10_000.0  # G_ema half-life in generated images (StyleGAN-style); 0 disables averaging (G_ema = G)
    ema_rampup: float | None = 0.05  # cap the half-life at this fraction of images seen so far, so short runs average; None: no ramp-up
    ema_batchnorm: str = "copy"  # G_ema's BatchNorm statistics: "copy" (the live G's) or "standing" (recomputed with G_ema before every sample grid and export)
    standing_images: int = 2048  # generated images (batches of 64) that standing statistics average over
    tau_step: float = 0.1  # attention scale tau grows by this ...
    tau_every_epochs: int = 5  # ... every this many epochs, from 0 ...
    tau_max: float = 1.0  # ... up to this value
    bf16: bool = False  # bf16 autocast for forward passes on CUDA (ignored on CPU)
    collapse_threshold: float = 0.01  # warn when a branch's D loss stays below this (D wins, G gets no signal); 0 disables

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"gan.betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("lr_g", "lr_d"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"gan.{name} must be > 0, got {getattr(self, name)}")
        if self.d_steps_per_g < 1:
            raise ConfigError(f"gan.d_steps_per_g must be >= 1, got {self.d_steps_per_g}")
        if self.mismatch_weight < 0:
            raise ConfigError(f"gan.mismatch_weight must be >= 0, got {self.mismatch_weight}")
        if self.ema_half_life_images < 0:
            raise ConfigError("gan.ema_half_life_images must be >= 0")
        if self.ema_batchnorm not in EMA_BATCHNORM:
            raise ConfigError(f"gan.ema_batchnorm must be one of {', '.join(EMA_BATCHNORM)}, "
                              f"got {self.ema_batchnorm!r}")
        if self.standing_images < 64:
            raise ConfigError(f"gan.standing_images must be >= 64 (one batch), got {self.standing_images}")
        if self.tau_every_epochs < 1:
            raise ConfigError(f"gan.tau_every_epochs must be >= 1, got {self.tau_every_epochs}")
        if self.tau_step < 0 or self.tau_max < 0:
            raise ConfigError("gan.tau_step and gan.tau_max must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """The training run: schedule, batch, checkpoints, workers."""

    epochs: int = 20  # passes over the real training split
    batch_size: int = 16  # global batch (all workers together); one real batch per D update
    max_steps: int | None = None  # stop after this many real batches (train_step calls); None: run all epochs
    class_balanced: bool = True  # sample real batches with equal class frequency
    checkpoint_every_images: int = 50_000  # real images between checkpoints (counted in images so batch changes keep the schedule)
    log_every_images: int = 5_000  # real images between metric lines
    num_workers: int = 1  # Ray Train workers (data-parallel replicas)
    use_gpu: bool = False  # one GPU per worker
    sync_batchnorm: bool | None = None  # G's BatchNorm statistics over the global batch (SyncBatchNorm); None: on with several GPU workers. Off: each worker normalises over its own batch_size / num_workers images
    seed: int = 0  # seeds weights, noise and data order

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every_images", "log_every_images", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.sync_batchnorm and not self.use_gpu and self.num_workers > 1:
            raise ConfigError(
                "train.sync_batchnorm needs GPU workers (PyTorch's SyncBatchNorm runs on GPUs only): "
                "set train.use_gpu=true, or sync_batchnorm=null to let each CPU worker normalise "
                "over its own share of the batch"
            )
        if self.batch_size % self.num_workers:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be divisible by "
                f"train.num_workers={self.num_workers} (it is the global batch)"
            )


    @property
    def synced_batchnorm(self) -> bool:
        """Whether G's BatchNorms run as SyncBatchNorm: as asked, else with several GPU workers."""
        if self.num_workers < 2:
            return False
        return self.use_gpu if self.sync_batchnorm is None else self.sync_batchnorm


@dataclass(frozen=True)
class Config:
    """A whole run: ``model``, ``gan`` and ``train`` sections."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the networks
    gan: GANConfig = field(default_factory=GANConfig)  # the adversarial optimisation
    train: TrainConfig = field(default_factory=TrainConfig)  # the schedule and the workers

    @property
    def resolutions(self) -> list[int]:
        """Branch output sides, low to high."""
        return self.model.branch_resolutions

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (tuples become lists)."""
        return _config.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Strict inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise."""
        return _config.from_dict(cls, data)

    def with_overrides(self, overrides: Mapping[str, Any] | None = None, **dotted: Any) -> Config:
        """A copy with dotted keys replaced: ``with_overrides({"model.ngf": 32})``.

        ``**dotted`` accepts the same keys (``with_overrides(**{"gan.lr_g": 1e-4})``).
        """
        return _config.with_overrides(self, {**(overrides or {}), **dotted})


def available_presets() -> list[str]:
    """Names of the GAN presets shipped with the package."""
    return _config.available_presets(KIND)


def load_config(path_or_preset: str | Path) -> Config:
    """A preset name (``"paper"``, ``"demo"``) or a YAML/JSON file path -> :class:`Config`.

    An unknown name raises :class:`ConfigError` listing the presets.
    """
    return Config.from_dict(_config.preset_or_file_data(KIND, path_or_preset))


def resolve_config(config_or_preset: Config | ModelConfig | str | Path) -> Config:
    """Accept a :class:`Config`, a preset name or path; a bare ModelConfig gets default sections."""
    if isinstance(config_or_preset, Config):
        return config_or_preset
    if isinstance(config_or_preset, ModelConfig):
        return Config(model=config_or_preset)
    return load_config(config_or_preset)

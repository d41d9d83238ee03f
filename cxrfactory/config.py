"""Typed run configuration: the single source of truth for model, GAN optimisation and training.

A run is described by one :class:`Config` (``model``, ``gan``, ``train``). Presets live as YAML
in ``cxrfactory/configs/`` (``paper``: Ann et al. 2020 exactly; ``demo``: small and fast enough
to learn on a 2-core CPU). The resolved config is saved with every checkpoint and artifact via
:meth:`Config.to_dict`; :meth:`Config.from_dict` reads it back strictly (an unknown key is an
error, never silently ignored), so a typo in a YAML file or an override fails loudly.

Overrides use dotted keys: ``cfg.with_overrides({"model.ngf": 32, "gan.lr_g": 1e-4})``, or from
a command line ``cfg.with_overrides(parse_overrides(["model.ngf=32"]))``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrfactory.errors import UserError
from cxrfactory.labels import DEFAULT_CLASSES, validate_classes

#: Folder of the YAML presets shipped with the package.
PRESET_DIR = Path(__file__).resolve().parent / "configs"

ARCHITECTURES = ("stackgan", "cdcgan")


class ConfigError(UserError, ValueError):
    """A configuration that cannot describe a run (unknown key, wrong type, bad value)."""


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

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(f"model.arch must be one of {ARCHITECTURES}, got {self.arch!r}")
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
    seed: int = 0  # seeds weights, noise and data order

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every_images", "log_every_images", "num_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.batch_size % self.num_workers:
            raise ConfigError(
                f"train.batch_size={self.batch_size} must be divisible by "
                f"train.num_workers={self.num_workers} (it is the global batch)"
            )


@dataclass(frozen=True)
class Config:
    """A whole run: ``model``, ``gan`` and ``train`` sections."""

    model: ModelConfig = field(default_factory=ModelConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def resolutions(self) -> list[int]:
        """Branch output sides, low to high."""
        return self.model.branch_resolutions

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (tuples become lists)."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Strict inverse of :meth:`to_dict`; missing keys take defaults, unknown keys raise."""
        return _build(cls, data, "")

    def with_overrides(self, overrides: Mapping[str, Any] | None = None, **dotted: Any) -> Config:
        """A copy with dotted keys replaced: ``with_overrides({"model.ngf": 32})``.

        ``**dotted`` accepts the same keys (``with_overrides(**{"gan.lr_g": 1e-4})``).
        """
        data = self.to_dict()
        for key, value in {**(overrides or {}), **dotted}.items():
            section, _, name = key.partition(".")
            if section not in data or not name or "." in name:
                raise ConfigError(
                    f"override {key!r} must look like 'section.field' with section in "
                    f"{sorted(data)}"
                )
            if name not in data[section]:
                raise ConfigError(
                    f"unknown field {key!r}; {section} fields: {', '.join(data[section])}"
                )
            data[section][name] = value
        return Config.from_dict(data)


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field's type hint; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        real = [opt for opt in options if opt is not type(None)]
        return _coerce(value, real[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, item, where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, args))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where} must be a finite number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def available_presets() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(path_or_preset: str | Path) -> Config:
    """A preset name (``"paper"``, ``"demo"``) or a YAML/JSON file path -> :class:`Config`.

    An unknown name raises ``ValueError`` listing the presets.
    """
    text = str(path_or_preset)
    path = Path(text)
    if not path.suffix and not path.exists():
        path = PRESET_DIR / f"{text}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown preset {text!r}; presets: {', '.join(available_presets())} "
                "(or give a path to a .yaml/.json file)"
            )
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    import yaml  # here, not at the top: models import this module on torch-only GPU boxes

    data = yaml.safe_load(path.read_text()) or {}
    return Config.from_dict(data)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["model.ngf=32", "gan.betas=[0.0, 0.99]"]`` -> ``{"model.ngf": 32, ...}`` (YAML values)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def resolve_config(config_or_preset: Config | ModelConfig | str | Path) -> Config:
    """Accept a :class:`Config`, a preset name or path; a bare ModelConfig gets default sections."""
    if isinstance(config_or_preset, Config):
        return config_or_preset
    if isinstance(config_or_preset, ModelConfig):
        return Config(model=config_or_preset)
    return load_config(config_or_preset)

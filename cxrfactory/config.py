"""One config system for every stage: typed frozen dataclasses, YAML presets, strict loading.

Every stage's config is a frozen dataclass (flat, like ``ClassifierConfig``, or nested in
sections, like the GAN's ``Config``). This module is the machinery they share:

* :func:`from_dict` builds one from a plain dict strictly: an unknown key is an error naming
  the allowed keys, a value of the wrong type is an error naming the field, a missing key takes
  the dataclass default (so presets and files may be partial). :func:`to_dict` is its inverse.
* :func:`with_overrides` replaces dotted keys (``{"model.ngf": 32}`` for a nested config,
  ``{"lr": 1e-3}`` for a flat one); :func:`parse_overrides` reads them from ``KEY=VALUE``
  strings, the value in YAML (``--set gan.betas=[0.0,0.99]``).
* Presets live in one folder per kind, ``cxrfactory/configs/<kind>/<name>.yaml``, for the kinds
  in :data:`KINDS`; :func:`preset_data` reads one, :func:`available_presets` lists them.
* :func:`add_config_arguments` and :func:`config_from_args` give every job with a config the
  same ``--preset NAME`` / ``--config FILE`` / ``--set KEY=VALUE`` flags, resolved in one order:
  preset or file, then the job's own flags, then ``--set``.

Imports no torch and no Ray (the model configs build on it); PyYAML is imported where a
preset, a file or an override is read, so a torch-only GPU box can build configs from dicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cxrfactory.errors import UserError

#: Root of the YAML presets shipped with the package, one folder per kind.
PRESET_ROOT = Path(__file__).resolve().parent / "configs"
#: The preset folders: GAN runs, classifier runs, the downstream-utility experiment, demo sizes.
KINDS = ("gan", "classifier", "utility", "demo")

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration that cannot describe a run (unknown key, wrong type, bad value)."""


# ------------------------------------------------------------------------ dict <-> dataclass
def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain JSON/YAML-able dict (tuples become lists)."""
    return _to_plain(dataclasses.asdict(config))


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Strict inverse of :func:`to_dict`: missing keys take defaults, unknown keys raise.

    ``prefix`` names the section in messages (``"model."``); nested dataclass fields are built
    recursively. A required field that is missing is a :class:`ConfigError` naming it.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + str(k) for k in unknown)}; "
            f"allowed{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)}"
        )
    missing = [f.name for f in fields if f.name not in data and _required(f)]
    if missing:
        raise ConfigError(f"missing required key(s) {', '.join(prefix + k for k in missing)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


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
        return _coerce_tuple(value, typing.get_args(hint), where)
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


def _coerce_tuple(value: Any, args: tuple[Any, ...], where: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0], where) for v in value)
    if len(value) != len(args):
        raise ConfigError(f"{where} must have {len(args)} items, got {value!r}")
    return tuple(_coerce(v, t, where) for v, t in zip(value, args))


# ---------------------------------------------------------------------------- dotted overrides
def set_dotted(cls: type, data: dict[str, Any], key: str, value: Any) -> None:
    """Put ``value`` at the dotted ``key`` of ``data`` (a partial dict of ``cls``), in place.

    The key is checked against the dataclass's fields (not against ``data``, which may be
    partial); a section given as a mapping is merged into what ``data`` holds.
    """
    parts = key.split(".")
    target, owner = data, cls
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(owner)]
        where = ".".join(parts[:depth])
        if part not in names:
            raise ConfigError(f"unknown field {key!r}; {where + ' fields' if where else 'fields'}: "
                              f"{', '.join(names)}")
        hint = typing.get_type_hints(owner)[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
                target[part] = merge(target.get(part) or {}, value)
            else:
                target[part] = value
            return
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"unknown field {key!r}: {'.'.join(parts[:depth + 1])} has no fields")
        child = target.get(part)
        if child is not None and not isinstance(child, Mapping):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])} must be a mapping, got {child!r}")
        target[part] = target = dict(child or {})  # a copy: the caller's nested dicts stay as they were
        owner = hint


def with_overrides(config: T, overrides: Mapping[str, Any] | None = None) -> T:
    """A copy of ``config`` with dotted keys replaced, checked and typed like :func:`from_dict`."""
    data = to_dict(config)
    for key, value in (overrides or {}).items():
        set_dotted(type(config), data, key, value)
    return from_dict(type(config), data)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["model.ngf=32", "gan.betas=[0.0, 0.99]"]`` -> ``{"model.ngf": 32, ...}`` (YAML values)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.field=value (or field=value)")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not YAML ({error})") from None
    return out


def merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``overlay`` on top of ``base``, section by section (a partial overlay keeps the rest)."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- files, presets
def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file (JSON is YAML) -> its mapping; an empty file is ``{}``."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{file} is not YAML or JSON: {error}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{file} must hold a mapping of config keys, got {type(data).__name__}")
    return dict(data)


def preset_dir(kind: str) -> Path:
    """The folder of one kind's presets."""
    if kind not in KINDS:
        raise ConfigError(f"unknown config kind {kind!r}; kinds: {', '.join(KINDS)}")
    return PRESET_ROOT / kind


def available_presets(kind: str) -> list[str]:
    """Names of one kind's presets shipped with the package."""
    return sorted(p.stem for p in preset_dir(kind).glob("*.yaml"))


def preset_data(kind: str, name: str) -> dict[str, Any]:
    """One preset as a (possibly partial) dict; an unknown name lists the presets."""
    path = preset_dir(kind) / f"{name}.yaml"
    if not name or "/" in name or not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; {kind} presets: {', '.join(available_presets(kind))}")
    return read_config_file(path)


def load_preset(cls: type[T], kind: str, name: str, **required: Any) -> T:
    """One preset as ``cls``; ``required`` supplies fields no preset holds (data locations)."""
    return from_dict(cls, {**preset_data(kind, name), **required})


def preset_or_file_data(kind: str, preset_or_path: str | Path) -> dict[str, Any]:
    """A preset name or a YAML/JSON path -> its dict (a name without a suffix is a preset)."""
    text = str(preset_or_path)
    path = Path(text)
    if not path.suffix and not path.exists():
        try:
            return preset_data(kind, text)
        except ConfigError as error:
            raise ConfigError(f"{error} (or give a path to a .yaml/.json file)") from None
    return read_config_file(path)


# ------------------------------------------------------------------------------- the CLI pair
def add_config_arguments(parser: argparse.ArgumentParser, kind: str | None = None, *,
                         default: str | None = None) -> None:
    """``--preset NAME`` (with a preset kind) or ``--config FILE``, and repeatable ``--set``."""
    source = parser.add_mutually_exclusive_group()
    if kind is not None:
        names = available_presets(kind)
        # Checked in config_from_args, not by argparse choices, so the error lists the folder's
        # presets in the project's words ("unknown preset ...").
        source.add_argument("--preset", default=None, metavar="{" + ",".join(names) + "}",
                            help=f"{kind} preset from cxrfactory/configs/{kind}/"
                                 f"{f' (default {default})' if default else ''}")
    source.add_argument("--config", default=None, metavar="FILE",
                        help="YAML/JSON config file (partial: missing fields take the defaults); "
                             "flags override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set",
                        help="any config field, e.g. --set section.field=value (YAML value; "
                             "repeatable; overrides the flags)")


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, cls: type[T], *,
                     kind: str | None = None, default: str | None = None,
                     overlays: Sequence[Mapping[str, Any]] = (),
                     flags: Mapping[str, Any] | None = None) -> T:
    """Resolve a job's config: preset or file, ``overlays``, ``flags`` (dotted; None = not
    given), then ``--set``. A :class:`ConfigError` is a usage error (usage, message, exit 2)."""
    try:
        data: dict[str, Any] = {}
        if getattr(args, "config", None):
            data = read_config_file(args.config)
        elif kind is not None and (getattr(args, "preset", None) or default):
            data = preset_data(kind, args.preset or default)
        for overlay in overlays:
            data = merge(data, overlay)
        for key, value in (flags or {}).items():
            if value is not None:
                set_dotted(cls, data, key, value)
        for key, value in parse_overrides(args.set).items():
            set_dotted(cls, data, key, value)
        return from_dict(cls, data)
    except ConfigError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits

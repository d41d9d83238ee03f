"""The generator artifact: what training leaves and synthesis consumes (DESIGN "Artifacts").

A directory::

    generator.pt   state dict of G_ema (tensors only: loads with ``weights_only=True``)
    config.json    the resolved run config, class vocabulary, resolutions, pixel normalisation
    sha256         hex digest of generator.pt; synthesis stamps it on every row it writes

A stranger's artifact cannot execute code: nothing in it is unpickled beyond tensors, and a
``generator.pt`` whose digest differs from ``sha256`` is refused as corrupt.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cxrfactory.errors import UserError
from cxrfactory import filenames
from cxrfactory.config import Config, ConfigError
from cxrfactory.storage import Location, resolve

#: How generator outputs map to pixels; recorded so a reader never has to guess.
NORMALISATION = {"output_range": [-1.0, 1.0], "to_uint8": "round((x + 1) * 127.5)", "channels": 1}


class ArtifactError(UserError, ValueError):
    """A missing, incomplete or corrupt artifact."""


@dataclass
class GeneratorArtifact:
    """A loaded generator artifact: the network (eval mode, on CPU) and what describes it."""

    generator: nn.Module
    config: Config
    sha256: str
    meta: dict[str, Any]  # the whole config.json

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.model.classes

    @property
    def resolution(self) -> int:
        return self.config.model.resolution


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_generator_artifact(out: str | Location, generator: nn.Module, config: Config,
                            extra: dict[str, Any] | None = None) -> str:
    """Write the artifact (weights first, then config, the digest last); returns the sha256.

    ``generator`` is G_ema (unwrapped from DDP by the caller or here).
    """
    loc = out if isinstance(out, Location) else resolve(out)
    net = getattr(generator, "module", generator)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buf)
    data = buf.getvalue()
    digest = sha256_bytes(data)
    meta = {
        "kind": "generator",
        "config": config.to_dict(),
        "classes": list(config.model.classes),
        "arch": config.model.arch,
        "resolution": config.model.resolution,
        "resolutions": config.model.branch_resolutions,
        "z_dim": config.model.z_dim,
        "normalisation": NORMALISATION,
        **(extra or {}),
    }
    loc.join(filenames.GENERATOR_WEIGHTS).write_bytes(data)
    loc.join(filenames.CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    loc.join(filenames.SHA256).write_text(digest + "\n")
    return digest


def load_generator_artifact(path: str | Location, *, s3_endpoint: str | None = None,
                            map_location: str | torch.device = "cpu") -> GeneratorArtifact:
    """Load and verify an artifact; every problem is an :class:`ArtifactError` naming the file."""
    from cxrfactory.models import build_generator

    loc = path if isinstance(path, Location) else resolve(path, s3_endpoint)
    files = {}
    for name in (filenames.GENERATOR_WEIGHTS, filenames.CONFIG, filenames.SHA256):
        try:
            files[name] = loc.join(name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactError(
                f"{loc.uri} is not a generator artifact: {name} is missing (expected "
                f"{filenames.GENERATOR_WEIGHTS}, {filenames.CONFIG} and {filenames.SHA256}, as jobs/train.py writes them)"
            ) from None
    digest = sha256_bytes(files[filenames.GENERATOR_WEIGHTS])
    expected = files[filenames.SHA256].decode(errors="replace").strip()
    if digest != expected:
        raise ArtifactError(f"{loc.join(filenames.GENERATOR_WEIGHTS).uri} is corrupt: its sha256 {digest[:12]}… "
                            f"differs from the recorded {expected[:12]}…")
    try:
        meta = json.loads(files[filenames.CONFIG])
        config = Config.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as exc:
        raise ArtifactError(f"{loc.join(filenames.CONFIG).uri} is not a valid artifact config: {exc}") from exc
    try:
        state = torch.load(io.BytesIO(files[filenames.GENERATOR_WEIGHTS]), map_location=map_location,
                           weights_only=True)
        generator = build_generator(config)
        generator.load_state_dict(state)
    except Exception as exc:  # any unpickling or shape error means the file is unusable
        raise ArtifactError(f"{loc.join(filenames.GENERATOR_WEIGHTS).uri} does not load into the generator its "
                            f"config describes: {exc}") from exc
    generator.eval()
    return GeneratorArtifact(generator, config, digest, meta)

"""The generator artifact: what training leaves and synthesis consumes (docs/architecture.md,
"Artifacts").

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

from cxrfactory import filenames
from cxrfactory.gan.config import Config, ConfigError
from cxrfactory.storage import Location, resolve
from cxrfactory.weights import ArtifactError, ArtifactFiles, read_artifact_files

#: How generator outputs map to pixels; recorded so a reader never has to guess.
NORMALISATION = {"output_range": [-1.0, 1.0], "to_uint8": "round((x + 1) * 127.5)", "channels": 1}


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


#: Where a good generator artifact comes from.
MADE_BY = "jobs/train.py (<run>/generator)"


def read_generator_files(path: str | Location, *, s3_endpoint: str | None = None) -> ArtifactFiles:
    """The artifact's files, read once through storage and verified: what actors receive."""
    loc = path if isinstance(path, Location) else resolve(path, s3_endpoint)
    return read_artifact_files(loc, filenames.GENERATOR_WEIGHTS, kind="generator", made_by=MADE_BY)


def load_generator_artifact(path: str | Location | ArtifactFiles, *, s3_endpoint: str | None = None,
                            map_location: str | torch.device = "cpu") -> GeneratorArtifact:
    """Load and verify an artifact (a folder, or its files already read); every problem is a
    :class:`~cxrfactory.errors.UserError` naming the file."""
    from cxrfactory.models import build_generator

    files = path if isinstance(path, ArtifactFiles) else read_generator_files(path, s3_endpoint=s3_endpoint)
    meta = files.config()
    try:
        config = Config.from_dict(meta["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise ArtifactError(f"{files.where(filenames.CONFIG)} is not a valid artifact config: {exc}") from exc
    state = files.state_dict(map_location)
    generator = build_generator(config)
    try:
        generator.load_state_dict(state)
    except Exception as exc:  # a shape or key mismatch means the file is unusable
        raise ArtifactError(f"{files.where(filenames.GENERATOR_WEIGHTS)} does not load into the generator "
                            f"its config describes: {exc}") from exc
    generator.eval()
    return GeneratorArtifact(generator, config, files.sha256, meta)

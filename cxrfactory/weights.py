"""Loading weights, and shipping an artifact's files to Ray actors (no Ray here).

Every ``torch.load`` of a checkpoint, artifact or weights file goes through :func:`load_weights`:
``weights_only=True`` refuses a file that holds pickled Python objects (loading those could run
code), and the refusal says so in our words, naming the job that writes a good file, rather
than passing on torch's advice to retry with ``weights_only=False``.

An artifact (the generator's or the classifier's: weights, ``config.json``, ``sha256``) is read
once on the driver through :mod:`cxrfactory.storage` as :class:`ArtifactFiles`, verified, and
handed to Ray actors as bytes in their constructor's arguments: it works on any cluster, with
or without a shared filesystem, and each actor builds its network from the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass
from typing import Any

import torch

from cxrfactory import filenames
from cxrfactory.errors import UserError
from cxrfactory.storage import Location


class WeightsError(UserError, ValueError):
    """A weights or checkpoint file that is not trusted or cannot be read as weights."""


class ArtifactError(UserError, ValueError):
    """A missing, incomplete or corrupt artifact."""


def load_weights(data: bytes, *, source: str, made_by: str,
                 map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of ``data`` (the bytes of ``source``).

    ``made_by`` names where a good file comes from (``"jobs/train.py"``). A file holding
    pickled objects other than tensors and plain values is refused unread, as is one torch
    cannot read; both raise :class:`WeightsError`.
    """
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(
            f"{source} is not trusted: it holds pickled Python objects, not plain weights, and "
            f"was not loaded (loading it could run code); use one written by {made_by}") from None
    except Exception as error:  # truncated, corrupt or not a torch file at all
        lines = [line for line in str(error).strip().splitlines() if "weights_only" not in line]
        reason = lines[0] if lines else type(error).__name__
        raise WeightsError(f"{source} is not a readable weights file ({reason}); "
                           f"use one written by {made_by}") from None


def sha256_hex(data: bytes) -> str:
    """The hex digest an artifact's ``sha256`` file records for its weights."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ArtifactFiles:
    """An artifact's files as bytes, read once and verified: what actors receive."""

    uri: str  # where they were read from (for messages)
    weights_name: str  # the weights file's name (generator.pt, classifier.pt)
    files: dict[str, bytes]  # file name -> bytes: the weights, config.json and sha256
    made_by: str  # the job that writes such an artifact

    @property
    def weights(self) -> bytes:
        return self.files[self.weights_name]

    @property
    def sha256(self) -> str:
        return sha256_hex(self.weights)

    def where(self, name: str) -> str:
        """A file's URI, for messages."""
        return f"{self.uri.rstrip('/')}/{name}"

    def config(self) -> dict[str, Any]:
        """The parsed ``config.json``; :class:`ArtifactError` when it is not a JSON object."""
        try:
            config = json.loads(self.files[filenames.CONFIG])
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ArtifactError(f"{self.where(filenames.CONFIG)}: corrupt JSON ({error})") from None
        if not isinstance(config, dict):
            raise ArtifactError(f"{self.where(filenames.CONFIG)}: expected a JSON object")
        return config

    def state_dict(self, map_location: str | torch.device = "cpu") -> Any:
        """The weights, loaded with :func:`load_weights`."""
        return load_weights(self.weights, source=self.where(self.weights_name),
                            made_by=self.made_by, map_location=map_location)


def read_artifact_files(loc: Location, weights_name: str, *, kind: str,
                        made_by: str) -> ArtifactFiles:
    """Read an artifact folder's three files through storage and check the weights' sha256.

    Raises :class:`ArtifactError` naming the file for a missing file or a digest mismatch.
    """
    files = {}
    for name in (weights_name, filenames.CONFIG, filenames.SHA256):
        try:
            files[name] = loc.join(name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactError(
                f"{loc.uri} is not a {kind} artifact: {name} is missing (expected {weights_name}, "
                f"{filenames.CONFIG} and {filenames.SHA256}, as {made_by} writes them)") from None
    artifact = ArtifactFiles(loc.uri, weights_name, files, made_by)
    expected = files[filenames.SHA256].decode(errors="replace").strip()
    if artifact.sha256 != expected:
        raise ArtifactError(
            f"{artifact.where(weights_name)} is corrupt: its sha256 {artifact.sha256[:12]}… "
            f"differs from the recorded {expected[:12] or 'empty'}… (the file is corrupt or was "
            f"replaced); use one written by {made_by}")
    return artifact

"""Where shards and artifacts live: a local path or an ``s3://bucket/prefix`` URI.

Every place the project reads or writes goes through :func:`resolve`, which returns a pyarrow
filesystem and a path inside it, so the same code serves a laptop folder and an S3 bucket.

Writes are atomic (docs/architecture.md, "Files appear whole or not at all"): locally a file is written under
a temporary name in the same folder and renamed; on S3 an object only becomes visible when its
upload completes, so a stopped writer leaves nothing behind.

S3 endpoints for S3-compatible stores come from ``--s3-endpoint`` or ``CXRF_S3_ENDPOINT``:
pyarrow ignores ``AWS_ENDPOINT_URL_S3`` in some versions, so we pass it explicitly.
"""

from __future__ import annotations

import errno
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from cxrfactory.errors import UserError

ENDPOINT_ENV = "CXRF_S3_ENDPOINT"


class StorageError(UserError, RuntimeError):
    """A location that cannot be read or written, with the reason and a way to fix it."""


@dataclass(frozen=True)
class Location:
    """A resolved place: a pyarrow filesystem and a path inside it, plus the URI it came from."""

    fs: pafs.FileSystem
    path: str  # no trailing slash; for S3 "bucket/key/prefix"
    uri: str
    s3_endpoint: str | None = None

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)

    def join(self, *parts: str) -> "Location":
        """A location below this one (``loc.join("train", "Mass", "part-00000.parquet")``)."""
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return Location(self.fs, path, uri, self.s3_endpoint)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        atomic_write_bytes(self, data)

    def write_text(self, text: str) -> None:
        atomic_write_bytes(self, text.encode("utf-8"))

    def list_files(self, suffix: str = "") -> list[str]:
        """Paths (relative to this location, '/'-separated, sorted) of every file below it."""
        if not self.exists():
            return []
        selector = pafs.FileSelector(self.path, recursive=True)
        prefix = self.path.rstrip("/") + "/"
        out = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.path.endswith(suffix):
                continue
            rel = info.path[len(prefix):] if info.path.startswith(prefix) else info.path
            # Temporary files of an interrupted local writer are not part of the data.
            if not is_temporary(posixpath.basename(rel)):
                out.append(rel)
        return sorted(out)

    def delete_contents(self) -> None:
        """Remove everything below this location (``--overwrite``)."""
        if self.exists():
            self.fs.delete_dir_contents(self.path, missing_dir_ok=True)

    def __str__(self) -> str:
        return self.uri


def s3_endpoint_from_env(explicit: str | None = None) -> str | None:
    """The S3 endpoint to use: the explicit flag, else ``CXRF_S3_ENDPOINT``, else AWS itself."""
    return explicit or os.environ.get(ENDPOINT_ENV) or None


def _s3_filesystem(endpoint: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
        # S3-compatible stores rarely care about the region, but the SDK insists on one.
        kwargs["region"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike, s3_endpoint: str | None = None) -> Location:
    """Local path or ``s3://bucket/prefix`` -> :class:`Location`.

    ``s3_endpoint`` (or ``CXRF_S3_ENDPOINT``) points at an S3-compatible store such as MinIO;
    credentials come from the standard AWS environment variables and files.
    """
    text = os.fspath(uri)
    if not text:
        raise StorageError("empty location; give a folder path or an s3://bucket/prefix URI")
    if text.startswith("s3://"):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise StorageError(f"{text!r} has no bucket; use s3://bucket/prefix")
        endpoint = s3_endpoint_from_env(s3_endpoint)
        path = (parsed.netloc + "/" + parsed.path.lstrip("/")).rstrip("/")
        return Location(_s3_filesystem(endpoint), path, text.rstrip("/"), endpoint)
    if "://" in text:
        raise StorageError(f"unsupported location {text!r}: use a local path or s3://bucket/prefix")
    path = str(Path(text).expanduser().absolute())
    return Location(pafs.LocalFileSystem(), path, path, None)


TEMPORARY_SUFFIX = ".tmp"


def temporary_name(name: str) -> str:
    """Where a local writer puts ``name``'s bytes before the rename. The leading ``.`` hides
    it from every directory reader (pyarrow, pandas, Ray Data skip ``.`` and ``_`` names) and
    the suffix from every ``*.parquet`` glob (Polars, DuckDB), so a writer killed mid-file
    leaves nothing a plain reader takes for data."""
    return f".{name}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"


def is_temporary(name: str) -> bool:
    """A local writer's temporary file: :func:`temporary_name`'s, or cxrfactory 0.1's
    ``.tmp-<id>-<name>``."""
    return name.startswith(".") and (name.endswith(TEMPORARY_SUFFIX) or name.startswith(".tmp-"))


def atomic_write_bytes(loc: Location, data: bytes) -> None:
    """Write ``data`` so that ``loc`` holds either the whole of it or nothing new."""
    parent = posixpath.dirname(loc.path)
    if loc.is_s3:
        # One PutObject (or a multipart upload completed on close): the object is visible
        # only once the upload is complete.
        try:
            with loc.fs.open_output_stream(loc.path) as out:
                out.write(data)
        except OSError as exc:
            raise StorageError(_explain_s3(exc, loc)) from exc
        return
    tmp = posixpath.join(parent, temporary_name(posixpath.basename(loc.path)))
    try:
        os.makedirs(parent, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc.path)
    except OSError as exc:
        raise StorageError(explain_write_error(exc, loc)) from exc
    finally:
        if os.path.exists(tmp):  # only after a failure: a successful rename consumed it
            os.unlink(tmp)


def check_writable(loc: Location) -> None:
    """Fail early, before any work, when ``loc`` cannot be written (permissions, credentials)."""
    probe = loc.join(f".write-probe-{uuid.uuid4().hex}")
    try:
        atomic_write_bytes(probe, b"ok")
        probe.fs.delete_file(probe.path)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(_explain_s3(exc, loc) if loc.is_s3 else explain_write_error(exc, loc))


#: errno values that mean "the disk (or the user's quota) is full".
DISK_FULL = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code)


def explain_write_error(exc: OSError, loc: Location) -> str:
    """Why ``loc`` could not be written, in one line; for a full disk, also that what was
    written before is intact and that running the same command again completes the output."""
    if exc.errno in DISK_FULL:
        what = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return (f"cannot write {loc.uri}: {what}. The files already written are intact; free "
                "some space, then run the same command again: it keeps them and completes the set")
    return f"cannot write {loc.uri}: {exc.strerror or exc}"


def check_readable(loc: Location, what: str = "input") -> None:
    """Fail with a clear message when ``loc`` does not exist or cannot be listed."""
    try:
        exists = loc.exists()
    except OSError as exc:
        raise StorageError(_explain_s3(exc, loc) if loc.is_s3 else f"cannot read {loc.uri}: {exc}")
    if not exists:
        raise StorageError(f"{what} {loc.uri} does not exist")


def _explain_s3(exc: BaseException, loc: Location) -> str:
    text = str(exc)
    hint = ""
    lowered = text.lower()
    if "credential" in lowered or "access denied" in lowered or "forbidden" in lowered:
        hint = (" — check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or the "
                "instance profile")
    elif "nosuchbucket" in lowered.replace(" ", "") or "bucket does not exist" in lowered:
        hint = " — create the bucket first"
    elif "connect" in lowered or "resolve" in lowered or "timeout" in lowered:
        hint = (f" — is the endpoint reachable? (--s3-endpoint / {ENDPOINT_ENV} = "
                f"{loc.s3_endpoint or 'AWS default'})")
    return f"S3 error on {loc.uri}: {text}{hint}"

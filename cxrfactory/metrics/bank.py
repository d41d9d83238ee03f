"""The feature bank: each image's classifier features (and a pixel thumbnail) computed once.

    read_shards (one split) ─▶ keep_sampled (per-class caps, by a hash of image_id) ─▶
    FeatureEmbedder actors (decode PNG; the classifier's preprocessing ─▶ pooled features and
    top-1 class; a 32×32 thumbnail of the stored pixels) ─▶ driver: Parquet parts, bank.json last

A bank is the per-sample store every metric reads (FDD's statistics, KID, PRDC,
class-consistency, the memorization audit), so a set is pushed through the DenseNet once per
classifier, not once per metric. It lives next to the set it describes::

    <shard root>/_features/<classifier sha256[:16]>/<split>-<identity[:12]>/
        build-<id>/part-00000.parquet ...   image_id, label, split, patient_id, feature
                                 (float32[d]), thumb (uint8[32*32]), predicted (top-1 class)
        bank.json                what made it (identity), its parts and rows per class; last

The leading ``_`` keeps pandas, pyarrow and Ray readers of the shard folder from seeing it; the
classifier's sha256 in the path means banks of two classifiers never mix, and ``bank.json``'s
identity (the set's manifest sha256, split, classes, sampling, classifier sha256 and
preprocessing) is checked on every open. A bank of every row of a split also serves a capped
request: the cap's rows are picked from it by the same hash rule (``raydata.keep_sampled``).
Where the set's folder cannot be written (a read-only bucket), ``bank_dir`` holds the banks.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cxrfactory import filenames, shards
from cxrfactory.errors import UserError
from cxrfactory.raydata import keep_sampled
from cxrfactory.storage import Location, StorageError, check_writable, resolve
from cxrfactory.weights import ArtifactFiles

FORMAT = 1
THUMB = 32  # thumbnail side in px: copy detection in pixel space, independent of the classifier
SAMPLE_SALT = "cxrfactory-fdd-sample"  # which rows a per-class cap keeps (FDD's, since format 1)
PART_ROWS = 8192  # rows per Parquet part (≈ 33 MB of float32 features at d = 1024)


class BankError(UserError, ValueError):
    """A feature bank that cannot be used: made by another classifier or from other images."""


@dataclass(frozen=True)
class BankRequest:
    """The rows of one set a metric needs: a split, some classes, optional per-class caps."""

    uri: str  # shard root (path or s3://)
    split: str
    classes: tuple[str, ...]
    thresholds: Mapping[str, float]  # per capped class (raydata.sample_thresholds); absent: all rows


@dataclass
class BankArrays:
    """Rows of a bank in memory (one class, a cap's rows, or all)."""

    image_id: np.ndarray  # (n,) str
    label: np.ndarray  # (n,) str
    patient_id: np.ndarray  # (n,) str
    predicted: np.ndarray  # (n,) str: the classifier's top-1 class
    feature: np.ndarray  # (n, d) float32
    thumb: np.ndarray | None  # (n, THUMB*THUMB) uint8, when read

    def __len__(self) -> int:
        return len(self.image_id)

    def take(self, keep: np.ndarray) -> "BankArrays":
        return BankArrays(self.image_id[keep], self.label[keep], self.patient_id[keep],
                          self.predicted[keep], self.feature[keep],
                          None if self.thumb is None else self.thumb[keep])

    def of_class(self, label: str) -> "BankArrays":
        return self.take(self.label == label)


def identity(request: BankRequest, *, manifest_sha256: str, classifier_sha256: str,
             preprocessing: Mapping[str, Any], feature_dim: int) -> dict[str, Any]:
    """What a bank's rows depend on; its fingerprint names the folder."""
    return {"format": FORMAT, "set_manifest_sha256": manifest_sha256, "split": request.split,
            "classes": sorted(request.classes),  # a set: the order a caller lists them in does not matter
            "sampling": {"salt": SAMPLE_SALT, "thresholds": dict(sorted(request.thresholds.items()))},
            "classifier_sha256": classifier_sha256, "preprocessing": dict(preprocessing),
            "feature_dim": int(feature_dim), "thumbnail": THUMB}


def bank_root(set_uri: str, classifier_sha256: str, *, bank_dir: str | None,
              s3_endpoint: str | None) -> Location:
    """The folder of one classifier's banks of a set: next to the set, or under ``bank_dir``."""
    if bank_dir:
        set_key = shards.fingerprint({"set": set_uri})[:12]
        return resolve(bank_dir, s3_endpoint).join(classifier_sha256[:16], set_key)
    return resolve(set_uri, s3_endpoint).join(filenames.FEATURES, classifier_sha256[:16])


class FeatureBank:
    """A finished bank: its location, identity and rows per class. Open with :func:`open_bank`."""

    def __init__(self, location: Location, meta: Mapping[str, Any],
                 thresholds: Mapping[str, float] | None = None) -> None:
        self.location = location
        self.meta = dict(meta)
        self.counts: dict[str, int] = dict(meta["counts"])
        self.feature_dim = int(meta["identity"]["feature_dim"])
        # A bank of every row serving a capped request keeps the cap's rows on read.
        self.thresholds = dict(thresholds or {})

    @property
    def uri(self) -> str:
        return self.location.uri

    def _parts(self) -> list[Location]:
        return [self.location.join(p) for p in self.meta["parts"]]

    def verify(self) -> None:
        """Every listed part is there and they hold the rows bank.json counts (footers only)."""
        rows = 0
        for part in self._parts():
            try:
                with part.fs.open_input_file(part.path) as f:
                    rows += pq.read_metadata(f).num_rows
            except (OSError, pa.ArrowInvalid) as exc:
                raise BankError(f"feature bank {self.uri} lacks or cannot read {part.uri} ({exc}); "
                                "delete its bank.json to rebuild it") from None
        if rows != sum(self.counts.values()):
            raise BankError(f"feature bank {self.uri} holds {rows} rows, its bank.json counts "
                            f"{sum(self.counts.values())}; delete its bank.json to rebuild it")

    def iter_blocks(self, *, thumbs: bool = False, classes: Sequence[str] | None = None
                    ) -> Iterator[BankArrays]:
        """The rows part by part (memory flat in the bank's size), optionally some classes only."""
        columns = ["image_id", "label", "patient_id", "predicted", "feature"] + (["thumb"] if thumbs else [])
        for part in self._parts():
            try:
                with part.fs.open_input_file(part.path) as f:
                    table = pq.read_table(f, columns=columns)
            except (OSError, pa.ArrowInvalid) as exc:
                raise BankError(f"cannot read feature bank part {part.uri}: {exc}; delete "
                                f"{self.uri} and run again to rebuild it") from None
            if self.thresholds:
                table = keep_sampled(table, thresholds=self.thresholds, salt=SAMPLE_SALT)
            if classes is not None:
                table = table.filter(pa.compute.is_in(table.column("label"), pa.array(list(classes))))
            if table.num_rows:
                yield _arrays(table, self.feature_dim, thumbs)

    def load(self, *, thumbs: bool = False, classes: Sequence[str] | None = None) -> BankArrays:
        """Every (kept) row in memory, sorted by image_id."""
        blocks = list(self.iter_blocks(thumbs=thumbs, classes=classes))
        if not blocks:
            return _empty(self.feature_dim, thumbs)
        rows = BankArrays(*(np.concatenate([getattr(b, f) for b in blocks]) if getattr(blocks[0], f) is not None
                            else None for f in ("image_id", "label", "patient_id", "predicted",
                                                "feature", "thumb")))
        # Rows arrive in the order the actors finished; sorted by image_id, a seeded draw
        # (KID's subsets, the bootstrap) picks the same images whichever bank served them.
        return rows.take(np.argsort(rows.image_id, kind="stable"))


def _arrays(table: pa.Table, dim: int, thumbs: bool) -> BankArrays:
    def strings(name: str) -> np.ndarray:
        return np.asarray(table.column(name).to_pylist(), dtype=str)

    def matrix(name: str, width: int, dtype: Any) -> np.ndarray:
        flat = table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return np.ascontiguousarray(flat.astype(dtype, copy=False).reshape(table.num_rows, width))

    return BankArrays(strings("image_id"), strings("label"), strings("patient_id"), strings("predicted"),
                      matrix("feature", dim, np.float32),
                      matrix("thumb", THUMB * THUMB, np.uint8) if thumbs else None)


def _empty(dim: int, thumbs: bool) -> BankArrays:
    none = np.zeros(0, dtype=str)
    return BankArrays(none, none, none, none, np.zeros((0, dim), np.float32),
                      np.zeros((0, THUMB * THUMB), np.uint8) if thumbs else None)


def open_bank(location: Location, expected: Mapping[str, Any]) -> FeatureBank | None:
    """The finished bank at ``location`` if its identity is ``expected``; None when there is
    none (or only the parts of an interrupted build); a bank of anything else is an error
    naming the difference."""
    marker = location.join(filenames.BANK)
    if not marker.exists():
        return None
    try:
        meta = json.loads(marker.read_text())
        found = meta["identity"]
        meta["counts"], meta["parts"]  # noqa: B018 (both must be present)
    except (ValueError, KeyError, TypeError) as exc:
        raise BankError(f"{marker.uri} is not a feature bank's record ({exc}); delete "
                        f"{location.uri} to rebuild it") from None
    for key, what in (("classifier_sha256", "classifier"), ("feature_dim", "feature dimension"),
                      ("preprocessing", "preprocessing"), ("set_manifest_sha256", "shard set"),
                      ("split", "split"), ("classes", "class selection"), ("sampling", "sampling"),
                      ("thumbnail", "thumbnail size"), ("format", "bank format")):
        if found.get(key) != expected[key]:
            raise BankError(f"feature bank {location.uri} was made with another {what} "
                            f"({found.get(key)!r} instead of {expected[key]!r}): it cannot be "
                            "mixed with this evaluation's features; delete it to rebuild it")
    bank = FeatureBank(location, meta)
    bank.verify()
    return bank


# --------------------------------------------------------------------------------------------
# Building banks (Ray Data)


class FeatureEmbedder:
    """Ray Data actor: rows -> one row per image with its features, top-1 class and thumbnail.

    The classifier travels as its files' bytes (read once on the driver) and is verified again
    on load, so no shared filesystem is needed.
    """

    def __init__(self, artifact: ArtifactFiles, *, inference_batch: int, threads: int | None) -> None:
        from cxrfactory.classifier.artifact import load_classifier_artifact
        from cxrfactory.models.densenet import preprocess

        loaded = load_classifier_artifact(artifact)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.model = loaded.model.to(self.device)
        self.preprocessing = loaded.preprocessing
        self.classes = np.asarray(loaded.classes, dtype=str)
        self.inference_batch = inference_batch
        self.preprocess = preprocess

    def __call__(self, batch: pa.Table) -> pa.Table:
        from cxrfactory.images import decode_png

        images = batch.column("image").to_pylist()
        features, predicted, thumbs = [], [], []
        for start in range(0, len(images), self.inference_batch):
            # Decoded a chunk at a time: a batch of full-size NIH images would not fit at once.
            chunk = [decode_png(item["bytes"] if isinstance(item, dict) else item)
                     for item in images[start:start + self.inference_batch]]
            thumbs.append(thumbnails(chunk))
            x = (self.preprocess(np.stack(chunk), self.preprocessing) if len({p.shape for p in chunk}) == 1
                 else torch.cat([self.preprocess(p[None], self.preprocessing) for p in chunk]))
            with torch.inference_mode():
                f = self.model.features(x.to(self.device))  # (B, d)
                predicted.append(self.model.classifier(f).argmax(dim=1).cpu().numpy())
            features.append(f.float().cpu().numpy())
        dim = self.model.feature_dim
        thumb = np.concatenate(thumbs) if thumbs else thumbnails([])
        feature = np.concatenate(features) if features else np.zeros((0, dim), np.float32)
        top1 = self.classes[np.concatenate(predicted)] if predicted else np.zeros(0, dtype=str)
        return pa.table({
            "bank": batch.column("bank"),
            "image_id": batch.column("image_id"),
            "label": batch.column("label"),
            "split": batch.column("split"),
            "patient_id": batch.column("patient_id"),
            "predicted": pa.array(top1.tolist(), type=pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(feature.reshape(-1), pa.float32()), dim),
            "thumb": pa.FixedSizeListArray.from_arrays(
                pa.array(thumb.reshape(-1), pa.uint8()), THUMB * THUMB),
        })


def thumbnails(pixels: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 (N, THUMB*THUMB): each image area-averaged to THUMB×THUMB (any input size)."""
    if not pixels:
        return np.zeros((0, THUMB * THUMB), np.uint8)
    out = [torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(p.astype(np.float32))[None], THUMB)
           for p in pixels]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8).reshape(len(pixels), -1).numpy()


def _tag(batch: pa.Table, *, bank: int, thresholds: Mapping[str, float]) -> pa.Table:
    batch = keep_sampled(batch, thresholds=thresholds, salt=SAMPLE_SALT)
    return batch.append_column("bank", pa.array(np.full(batch.num_rows, bank, np.int32)))


@dataclass(frozen=True)
class BankCompute:
    """How the embedding actors run."""

    batch_rows: int = 512  # rows per actor call
    inference_batch: int = 64  # images per forward pass
    workers: int | None = None  # actors; None: one per GPU with GPUs, else 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0  # Ray CPUs per actor (also its torch threads, on CPU)
    s3_endpoint: str | None = None


def build_banks(todo: Sequence[tuple[BankRequest, Location, dict[str, Any]]], *, files: ArtifactFiles,
                compute: BankCompute, log=print) -> list[FeatureBank]:
    """Embed every ``(request, location, identity)`` through one actor pool (the model loaded
    once per actor); each bank's parts are written as they arrive, ``bank.json`` last."""
    import ray

    from cxrfactory.raydata import read_shards

    if not todo:
        return []
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if compute.use_gpu is None else compute.use_gpu
    if use_gpu and not gpus:
        raise BankError("GPU feature actors were asked for, but the Ray cluster has no GPU")
    # Each build writes into a folder of its own and publishes by writing bank.json (which
    # names its parts) last: two runs building one bank never touch each other's parts, and
    # the one that finishes second replaces an identical bank. An interrupted build leaves an
    # unreferenced build-* folder, which no run reads (delete it freely).
    builds = [location.join(f"build-{uuid.uuid4().hex[:12]}") for _, location, _ in todo]
    parts = []
    for index, (request, _, _) in enumerate(todo):
        ds, _ = read_shards(request.uri, split=request.split, classes=list(request.classes),
                            columns=["image", "image_id", "label", "split", "patient_id"],
                            s3_endpoint=compute.s3_endpoint)
        parts.append(ds.map_batches(_tag, batch_format="pyarrow", fn_kwargs={
            "bank": index, "thresholds": dict(request.thresholds)}))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = ds.map_batches(
        FeatureEmbedder,
        fn_constructor_kwargs={"artifact": files, "inference_batch": compute.inference_batch,
                               "threads": max(1, int(compute.cpus_per_worker))},
        batch_size=compute.batch_rows, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=compute.workers or (gpus if use_gpu else 1)),
        num_cpus=compute.cpus_per_worker, num_gpus=1 if use_gpu else 0,
    )
    writers = [_PartWriter(build) for build in builds]
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        which = batch.column("bank").to_numpy()
        for index in np.unique(which):
            writers[int(index)].add(batch.filter(pa.array(which == index)).drop_columns(["bank"]))
    banks = []
    for writer, (request, location, ident) in zip(writers, todo):
        writer.flush()
        parts = [f"{writer.location.path.rsplit('/', 1)[-1]}/{name}" for name in writer.parts]
        meta = {"identity": ident, "uri": request.uri, "parts": parts,
                "counts": {c: int(writer.counts.get(c, 0)) for c in request.classes}}
        location.join(filenames.BANK).write_text(json.dumps(meta, indent=2) + "\n")
        log(f"[bank] {sum(meta['counts'].values())} rows of {request.uri} (split {request.split}) "
            f"-> {location.uri}")
        banks.append(FeatureBank(location, meta))
    return banks


class _PartWriter:
    """Buffers one bank's rows and writes them as Parquet parts of about PART_ROWS rows."""

    def __init__(self, location: Location) -> None:
        self.location, self.pending, self.parts = location, [], []
        self.counts: dict[str, int] = {}

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        for label, n in zip(*np.unique(np.asarray(table.column("label").to_pylist(), dtype=str),
                                       return_counts=True)):
            self.counts[str(label)] = self.counts.get(str(label), 0) + int(n)
        if sum(t.num_rows for t in self.pending) >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.pending = []
        name = f"part-{len(self.parts):05d}.parquet"
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.location.join(name).write_bytes(buffer.getvalue())
        self.parts.append(name)



def manifest_sha256(uri: str, s3_endpoint: str | None) -> str:
    """The sha256 of a shard set's manifest bytes: the set's fingerprint (a bank of an older
    state of the set is not this set's)."""
    import hashlib

    root = resolve(uri, s3_endpoint)
    shards.read_manifest(root)  # a clear error for a folder that is not a finished set
    return hashlib.sha256(shards.manifest_location(root, note=False).read_bytes()).hexdigest()


def ensure_banks(requests: Sequence[BankRequest], *, artifact: Any, files: ArtifactFiles,
                 compute: BankCompute, bank_dir: str | None = None, fallback_dir: str | None = None,
                 log=print) -> list[FeatureBank]:
    """One open bank per request: reused when it exists (a capped request is also served by
    a bank of every row), the missing ones built in one pipeline.

    Banks live next to their set, or under ``bank_dir``; when a set's folder cannot be written
    (a read-only bucket) and no ``bank_dir`` is given, under ``fallback_dir`` (a job's output).
    """
    preprocessing = artifact.preprocessing.to_dict()
    found: list[FeatureBank | None] = []
    todo: dict[str, tuple[BankRequest, Location, dict[str, Any]]] = {}
    where: list[str] = []
    for request in requests:
        sha = manifest_sha256(request.uri, compute.s3_endpoint)
        roots = [bank_root(request.uri, artifact.sha256, bank_dir=bank_dir, s3_endpoint=compute.s3_endpoint)]
        if fallback_dir and not bank_dir:
            roots.append(bank_root(request.uri, artifact.sha256, bank_dir=fallback_dir,
                                   s3_endpoint=compute.s3_endpoint))

        def locate(root: Location, req: BankRequest) -> tuple[Location, dict[str, Any]]:
            ident = identity(req, manifest_sha256=sha, classifier_sha256=artifact.sha256,
                             preprocessing=preprocessing, feature_dim=artifact.model.feature_dim)
            return root.join(f"{req.split}-{shards.fingerprint(ident)[:12]}"), ident

        every = BankRequest(request.uri, request.split, request.classes, {})
        bank = None
        for root in roots:
            bank = open_bank(*locate(root, every))
            if bank is not None and request.thresholds:
                bank = FeatureBank(bank.location, bank.meta, request.thresholds)
            bank = bank or open_bank(*locate(root, request))
            if bank is not None:
                break
        if bank is not None:
            log(f"[bank] reusing {bank.uri}")
            found.append(bank)
            where.append(bank.uri)
            continue
        location, ident = locate(_writable(roots, request.uri, log), request)
        todo.setdefault(location.uri, (request, location, ident))
        found.append(None)
        where.append(location.uri)
    built = dict(zip(todo, build_banks(list(todo.values()), files=files, compute=compute, log=log)))
    return [bank if bank is not None else built[uri] for bank, uri in zip(found, where)]


def _writable(roots: Sequence[Location], set_uri: str, log) -> Location:
    """The first root a bank can be written under (probed once per build)."""
    for number, root in enumerate(roots):
        try:
            check_writable(root)
        except StorageError as exc:
            if number + 1 < len(roots):
                log(f"[bank] {root.uri} cannot be written ({exc}); the bank of {set_uri} goes "
                    f"under {roots[number + 1].uri}")
                continue
            raise BankError(f"cannot write a feature bank at {root.uri} ({exc}); give a "
                            "writable --bank-dir") from None
        return root
    raise AssertionError("no bank root")  # roots is never empty

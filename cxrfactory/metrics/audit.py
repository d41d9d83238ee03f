"""The memorization audit: does a synthetic set copy the patients it was trained on?

    feature banks (metrics/bank.py): real train split, real held-out split (test), the audited set
    ─▶ exact nearest training image of every held-out and every audited image, in feature space
       (unit-length DenseNet features) and in pixel space (32×32 thumbnails) (metrics/nearest.py)
    ─▶ the rule (metrics/memorization.py): thresholds at a low percentile of the held-out
       distances; an audited image closer than that in either space is flagged
    ─▶ <out>/audit.json, <out>/flagged.parquet, <out>/closest.png

The audited set is streamed through the search part by part (memory flat in its size); the
training split is held once per space. ``--synthetic`` may be any shard folder, real ones
included: auditing a real split against the training split is how the rule is validated, and
every row is audited whatever its split.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxrfactory import filenames, shards
from cxrfactory.errors import UserError
from cxrfactory.metrics.bank import BankArrays, BankCompute, BankRequest, ensure_banks, manifest_sha256
from cxrfactory.metrics.fdd_pipeline import half_of
from cxrfactory.metrics.memorization import (
    AuditRule,
    distance_summary,
    false_flag_rate,
    flag,
    thresholds as rule_thresholds,
)
from cxrfactory.metrics.nearest import NearestIndex, normalize_features, thumbnail_vectors
from cxrfactory.storage import Location, check_readable, check_writable, resolve

__all__ = ["AuditConfig", "AuditError", "AuditResult", "AuditRule", "audit", "run_audit"]

SPACES = ("feature", "pixel")
CLOSEST_PAIRS = 8  # pairs shown side by side in closest.png and the report


class AuditError(UserError, ValueError):
    """An audit that cannot be run as asked."""


@dataclass(frozen=True)
class AuditConfig:
    """One audit: a set of images against a real training split (the job's flags)."""

    real: str  # real shard root holding the training and held-out splits
    synthetic: str  # the audited shard root (synthetic or real): every row, whatever its split
    classifier: str  # classifier artifact folder (its features are the feature space)
    out: str  # output folder: audit.json, flagged.parquet, closest.png
    split: str = "train"  # the real split a copy would come from
    held_out: str = "test"  # the real split of new patients: the reference distances
    percentile: float = 1.0  # the threshold: this percentile of the held-out distances
    bank_dir: str | None = None  # where feature banks go; None: next to each set, or <out>/banks where a set cannot be written
    batch_rows: int = 512
    inference_batch: int = 64
    workers: int | None = None
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        if self.split == self.held_out:
            raise AuditError(f"the held-out split must differ from the training split ({self.split!r}): "
                             "a training image is at distance 0 from itself")
        AuditRule(percentile=self.percentile)  # validates the percentile


@dataclass
class AuditResult:
    """Distances, thresholds and flags of one audit (everything audit.json and flagged.parquet hold)."""

    rule: AuditRule
    thresholds: dict[str, float]
    held_out: dict[str, np.ndarray]  # space -> nearest-training distance of each held-out image
    held_out_flag_rate: float | None  # cross-fitted false-flag rate on held-out images
    image_id: np.ndarray  # audited rows
    label: np.ndarray
    distance: dict[str, np.ndarray]  # space -> (n,)
    nearest: dict[str, np.ndarray]  # space -> nearest training image_id
    flagged: np.ndarray  # (n,) bool
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)

    def rule_record(self) -> dict[str, Any]:
        return {"percentile": self.rule.percentile, "spaces": list(self.rule.spaces),
                "description": (
                    f"an image is a near-copy when, in feature space (unit-length classifier "
                    f"features) or pixel space (32x32 thumbnails), its distance to the nearest "
                    f"training image is below percentile {self.rule.percentile:g} of the "
                    "held-out real images' nearest-training distances in that space")}


def audit(train: BankArrays, held_out: BankArrays, audited: Iterable[BankArrays],
          rule: AuditRule, classes: Sequence[str] = ()) -> AuditResult:
    """Nearest training image of every held-out and audited row; the rule's flags. Per-class
    results follow ``classes`` (a vocabulary's order), then any other class alphabetically."""
    if len(train) == 0 or len(held_out) == 0:
        raise AuditError("the audit needs rows in both the training and the held-out split")
    if train.thumb is None or held_out.thumb is None:
        raise AuditError("the audit reads thumbnails: load the banks with thumbs=True")
    indexes = {"feature": NearestIndex(normalize_features(train.feature)),
               "pixel": NearestIndex(thumbnail_vectors(train.thumb))}

    def vectors(rows: BankArrays, space: str) -> np.ndarray:
        return normalize_features(rows.feature) if space == "feature" else thumbnail_vectors(rows.thumb)

    held = {s: indexes[s].search(vectors(held_out, s))[0] for s in rule.spaces}
    limits = rule_thresholds(rule, held)
    fold = half_of(held_out.patient_id)
    ids, labels, dist, near = [], [], {s: [] for s in rule.spaces}, {s: [] for s in rule.spaces}
    for block in audited:
        if block.thumb is None:
            raise AuditError("the audit reads thumbnails: read the audited bank with thumbs=True")
        ids.append(block.image_id)
        labels.append(block.label)
        for s in rule.spaces:
            d, i = indexes[s].search(vectors(block, s))
            dist[s].append(d)
            near[s].append(train.image_id[i] if len(i) else np.zeros(0, dtype=str))
    join = (lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype=dtype))
    distance = {s: join(dist[s], np.float64) for s in rule.spaces}
    result = AuditResult(
        rule, limits, held, false_flag_rate(rule, held, fold),
        join(ids, str), join(labels, str), distance, {s: join(near[s], str) for s in rule.spaces},
        flag(rule, limits, distance) if ids else np.zeros(0, dtype=bool))
    present = set(result.label.tolist())
    for c in [c for c in classes if c in present] + sorted(present - set(classes)):
        mine = result.label == c
        result.per_class[c] = {
            "n": int(mine.sum()), "flagged": int(result.flagged[mine].sum()),
            "flag_rate": float(result.flagged[mine].mean()),
            "distances": {s: distance_summary(distance[s][mine]) for s in rule.spaces}}
    return result


def flagged_table(result: AuditResult) -> pa.Table:
    """``flagged.parquet``: one row per flagged image, its nearest training image in the space
    where it is closest relative to that space's threshold (the one that flagged it), the
    pixel-space neighbour too, and both distances."""
    f = result.flagged
    feature = result.distance.get("feature", np.full(len(f), np.nan))
    pixel = result.distance.get("pixel", np.full(len(f), np.nan))
    nearest = _nearest_by_closest_space(result)
    pixel_nearest = result.nearest.get("pixel", nearest)
    return pa.table({
        "image_id": pa.array(result.image_id[f].tolist(), pa.string()),
        "label": pa.array(result.label[f].tolist(), pa.string()),
        "nearest_real_id": pa.array(nearest[f].tolist(), pa.string()),
        "feature_distance": pa.array(feature[f], pa.float64()),
        "pixel_distance": pa.array(pixel[f], pa.float64()),
        "nearest_real_id_pixel": pa.array(pixel_nearest[f].tolist(), pa.string()),
    })


# --------------------------------------------------------------------------------------------
# The job


def run_audit(config: AuditConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build or reuse the three banks, audit, write audit.json, flagged.parquet, closest.png."""
    from cxrfactory.classifier.artifact import load_classifier_artifact, read_classifier_files

    files = read_classifier_files(config.classifier, config.s3_endpoint)
    artifact = load_classifier_artifact(files)
    real_root, audited_root = (resolve(u, config.s3_endpoint) for u in (config.real, config.synthetic))
    check_readable(real_root, "--real folder")
    check_readable(audited_root, "--synthetic folder")
    real, audited = shards.read_manifest(real_root), shards.read_manifest(audited_root)
    for split in (config.split, config.held_out):
        if not real.counts.get(split):
            raise AuditError(f"{config.real} has no rows in split {split!r} (it holds "
                             f"{', '.join(s for s, c in real.counts.items() if sum(c.values()))})")
    foreign = [c for c in audited.classes if c not in real.classes]
    if foreign:
        raise AuditError(f"{config.synthetic} holds classes {', '.join(foreign)} that {config.real} does "
                         f"not ({', '.join(real.classes)}): audit a set against the real data its "
                         "generator was trained on")
    if not audited.total():
        raise AuditError(f"{config.synthetic} holds no rows to audit")
    out = resolve(config.out, config.s3_endpoint)
    check_writable(out)

    def request(uri: str, manifest: shards.Manifest, split: str) -> BankRequest:
        return BankRequest(uri, split, tuple(c for c in manifest.classes if manifest.counts[split].get(c)), {})

    requests = [request(config.real, real, config.split), request(config.real, real, config.held_out)]
    requests += [request(config.synthetic, audited, split) for split in audited.counts
                 if sum(audited.counts[split].values())]
    compute = BankCompute(batch_rows=config.batch_rows, inference_batch=config.inference_batch,
                          workers=config.workers, use_gpu=config.use_gpu,
                          cpus_per_worker=config.cpus_per_worker, s3_endpoint=config.s3_endpoint)
    banks = ensure_banks(requests, artifact=artifact, files=files, compute=compute,
                         bank_dir=config.bank_dir, fallback_dir=out.join("banks").uri, log=log)
    train, held_out = (b.load(thumbs=True) for b in banks[:2])
    blocks = (block for bank in banks[2:] for block in bank.iter_blocks(thumbs=True))
    result = audit(train, held_out, blocks, AuditRule(percentile=config.percentile), audited.classes)
    record = _record(config, result, artifact.sha256, len(train), len(held_out))
    buffer = io.BytesIO()
    pq.write_table(flagged_table(result), buffer)
    out.join(filenames.FLAGGED).write_bytes(buffer.getvalue())
    out.join(filenames.CLOSEST).write_bytes(closest_pairs_png(config, result))
    out.join(filenames.AUDIT).write_text(_json(record))  # last: the audit is complete
    log(format_summary(record))
    return record


def _record(config: AuditConfig, result: AuditResult, classifier_sha: str, n_train: int,
            n_held_out: int) -> dict[str, Any]:
    flagged_total = int(result.flagged.sum())
    return {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(),
        "synthetic": {"uri": resolve(config.synthetic, config.s3_endpoint).uri, "manifest_sha256": manifest_sha256(config.synthetic, config.s3_endpoint),
                      "n": {c: v["n"] for c, v in result.per_class.items()}},
        "real": {"uri": resolve(config.real, config.s3_endpoint).uri, "split": config.split, "n": n_train,
                 "manifest_sha256": manifest_sha256(config.real, config.s3_endpoint)},
        "held_out": {"uri": resolve(config.real, config.s3_endpoint).uri, "split": config.held_out, "n": n_held_out,
                     "distances": {s: distance_summary(d) for s, d in result.held_out.items()}},
        "classifier": {"path": config.classifier, "sha256": classifier_sha},
        "rule": result.rule_record(),
        "thresholds": result.thresholds,
        "held_out_flag_rate": result.held_out_flag_rate,
        "flagged": {c: v["flagged"] for c, v in result.per_class.items()},
        "flag_rate": {c: v["flag_rate"] for c, v in result.per_class.items()},
        "flagged_total": flagged_total,
        "flag_rate_total": flagged_total / max(1, len(result.flagged)),
        "per_class": result.per_class,
        "closest": _closest(result),
    }


def _relative(result: AuditResult) -> np.ndarray:
    """(spaces, n): each distance over its space's threshold (below 1: flagged there)."""
    return np.stack([result.distance[s] / max(result.thresholds[s], 1e-12) for s in result.rule.spaces])


def _nearest_by_closest_space(result: AuditResult) -> np.ndarray:
    """Per row, the nearest training image of the space where the row is closest relative to
    that space's threshold: the neighbour that flagged it."""
    if not len(result.flagged):
        return np.zeros(0, dtype=str)
    which = np.argmin(_relative(result), axis=0)
    by_space = np.stack([result.nearest[s] for s in result.rule.spaces])
    return by_space[which, np.arange(len(which))]


def _closest(result: AuditResult, n: int = CLOSEST_PAIRS) -> list[dict[str, Any]]:
    """The audited images closest to a training image relative to the thresholds (the smaller
    of distance / threshold over the spaces; flagged or not), each with that neighbour."""
    if not len(result.flagged):
        return []
    order = np.argsort(np.min(_relative(result), axis=0), kind="stable")[:n]
    nearest = _nearest_by_closest_space(result)
    return [{"image_id": str(result.image_id[i]), "label": str(result.label[i]),
             "nearest_real_id": str(nearest[i]),
             **{f"{s}_distance": float(result.distance[s][i]) for s in result.rule.spaces},
             "flagged": bool(result.flagged[i])} for i in order]


def _json(record: Mapping[str, Any]) -> str:
    import json

    return json.dumps(record, indent=2) + "\n"


def format_summary(record: Mapping[str, Any]) -> str:
    """The terminal summary: per-class flag rates and the rule's implied false-flag rate."""
    lines = [f"[audit] {record['flagged_total']} of {sum(record['synthetic']['n'].values())} images "
             f"flagged as near-copies of {record['real']['uri']} (split {record['real']['split']}); "
             f"rule: below percentile {record['rule']['percentile']:g} of the held-out distances "
             f"({', '.join(f'{s} {t:.4g}' for s, t in record['thresholds'].items())})"]
    ffr = record["held_out_flag_rate"]
    lines.append("[audit] held-out real images flagged by the same rule (cross-fitted): "
                 + ("n/a" if ffr is None else f"{100 * ffr:.1f}%"))
    lines += [f"[audit]   {c}: {v} of {record['synthetic']['n'][c]} ({100 * record['flag_rate'][c]:.1f}%)"
              for c, v in record["flagged"].items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The closest pairs, as pictures


def read_images(root: Location, manifest: shards.Manifest, ids: Sequence[str],
                split: str | None = None) -> dict[str, bytes]:
    """PNG bytes of the rows with these image ids: each shard's ``image_id`` column first, the
    ``image`` column only of the shards that hold one (a few of a set's files, not all)."""
    wanted, found = set(ids), {}
    for path in shards.select_files(manifest, None, split):
        if len(found) == len(wanted):
            break
        loc = root.join(path)
        with loc.fs.open_input_file(loc.path) as f:
            held = set(pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist())
        hits = (wanted - set(found)) & held
        if not hits:
            continue
        with loc.fs.open_input_file(loc.path) as f:
            table = pq.read_table(f, columns=["image_id", "image"])
        for row in table.filter(pa.compute.is_in(table.column("image_id"), pa.array(sorted(hits)))).to_pylist():
            image = row["image"]
            found[row["image_id"]] = image["bytes"] if isinstance(image, dict) else image
    return found


def closest_pairs_png(config: AuditConfig, result: AuditResult) -> bytes:
    """A figure: each of the closest audited images beside its nearest training image."""
    from matplotlib.figure import Figure

    from cxrfactory.images import decode_png, figure_png

    pairs = _closest(result)
    if not pairs:
        fig = Figure(figsize=(4, 1))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no audited images", ha="center", va="center")
        return figure_png(fig)
    audited = read_images(resolve(config.synthetic, config.s3_endpoint),
                          shards.read_manifest(resolve(config.synthetic, config.s3_endpoint)),
                          [p["image_id"] for p in pairs])
    real = read_images(resolve(config.real, config.s3_endpoint),
                       shards.read_manifest(resolve(config.real, config.s3_endpoint)),
                       [p["nearest_real_id"] for p in pairs], split=config.split)
    fig = Figure(figsize=(1.6 * len(pairs), 3.6))
    axes = fig.subplots(2, len(pairs), squeeze=False)
    for column, pair in enumerate(pairs):
        for row, (images, key, title) in enumerate(((audited, "image_id", pair["label"]),
                                                    (real, "nearest_real_id", "nearest real"))):
            ax = axes[row][column]
            ax.axis("off")
            if pair[key] in images:
                ax.imshow(decode_png(images[pair[key]]), cmap="gray", vmin=0, vmax=255)
            ax.set_title(title if row else f"{title}\nd={pair.get('feature_distance', float('nan')):.3f}"
                         + (" FLAG" if pair["flagged"] else ""), fontsize=7)
    fig.suptitle("closest audited images (top) and their nearest training images (bottom)", fontsize=8)
    return figure_png(fig, tight=True, grayscale=True)

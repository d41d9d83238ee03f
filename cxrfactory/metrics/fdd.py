"""Per-class Fréchet DenseNet Distance (FDD) and the sample-level metrics, and the paper's Table 1.

For each class, FDD is the Fréchet distance between Gaussians fitted to the classifier's pooled
features of real and of synthetic images of that class (lower is better). The pipeline::

    feature banks (metrics/bank.py: each set's rows, sampled per class by a hash of image_id,
    embedded once per classifier by Ray Data actors and kept as Parquet next to the set)
    ─▶ exact float64 statistics per class ─▶ Fréchet distance per class
    ─▶ the registry's other metrics on the same rows (metrics/registry.py: KID, PRDC,
       FDD's excess over the floor, memorization)

The real side's statistics are also cached as ``.npz`` (``--real-stats``/``--cache-dir``), keyed
by (real manifest, split, sampling, classifier sha256, preprocessing).

Two references make the numbers readable: a floor, the FDD between two patient-disjoint halves
of the real split (what "as close as real images are to each other" looks like, measured at
half the sample size, so slightly inflated), and class-consistency, the classifier's top-1
accuracy on each class's synthetic rows (is the image recognisably of its class), next to its
accuracy on the real rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from cxrfactory import shards
from cxrfactory.labels import validate_classes
from cxrfactory.metrics.fdd_tables import OUTPUTS, write_outputs
from cxrfactory.metrics.frechet import frechet_distance, prepare_reference
from cxrfactory.metrics import registry
from cxrfactory.metrics.bank import SAMPLE_SALT, BankCompute, BankRequest, ensure_banks
from cxrfactory.metrics.fdd_pipeline import HALF_SALT, HALVES, FDDError, SideStats, side_stats
from cxrfactory.metrics.stats import FeatureStats
from cxrfactory.classifier.artifact import load_classifier_artifact, read_classifier_files
from cxrfactory.named_sets import check_named_uris
from cxrfactory.raydata import sample_thresholds
from cxrfactory.storage import Location, check_readable, resolve
from cxrfactory.weights import ArtifactFiles

#: Images per class in the paper's FDD evaluation (Ann et al. 2020, Table 1).
PAPER_PROTOCOL: dict[str, int] = {
    "Atelectasis": 1000, "Cardiomegaly": 575, "Effusion": 1000, "Infiltration": 1000,
    "Mass": 729, "Nodule": 774, "Pneumonia": 242, "Pneumothorax": 539,
}
CACHE_FORMAT = 1



@dataclass(frozen=True)
class FDDConfig:
    """One FDD evaluation: a real split against one or more synthetic sets."""

    real: str  # real shard root (path or s3://)
    synthetic: tuple[tuple[str, str], ...]  # (name, shard root) per synthetic set: one table row each
    classifier: str  # classifier artifact folder: local path or s3:// URI
    out: str  # output folder (path or s3://): fdd.json, fdd.csv, fdd.md, cache/
    split: str = "test"  # the real split compared against
    classes: tuple[str, ...] | None = None  # None: every class all sides hold (the paper's 8 with paper_protocol)
    max_per_class: int | None = None  # at most N rows per class and side, chosen by a hash of image_id
    paper_protocol: bool = False  # the paper's per-class counts (PAPER_PROTOCOL), capped by what exists
    real_stats: str | None = None  # explicit real-side statistics file: reused when present (must match), else written
    cache_dir: str | None = None  # folder of cached real-side statistics; None: <out>/cache
    batch_rows: int = 512  # rows per actor call; each call emits one partial statistic per class
    inference_batch: int = 64  # images per forward pass
    workers: int | None = None  # feature actors; None: one per GPU with GPUs, else 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0  # Ray CPUs per actor (also its torch threads, on CPU)
    s3_endpoint: str | None = None  # S3-compatible endpoint for s3:// locations
    metrics: tuple[str, ...] = registry.DEFAULT  # by name (metrics/registry.py); fdd and class_consistency always
    bank_dir: str | None = None  # where feature banks go; None: next to each set (<set>/_features), or <cache>/banks where a set cannot be written
    bootstrap_reps: int = 100  # resamples of FDD's excess-over-floor interval
    seed: int = 0  # the bootstrap's and KID's subset draws

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "metrics", registry.select(self.metrics))
        except registry.MetricError as error:
            raise FDDError(str(error)) from None
        if self.bootstrap_reps < 10:
            raise FDDError(f"bootstrap_reps must be >= 10 for a 95% interval, got {self.bootstrap_reps}")
        if "memorization" in self.metrics and self.split == "train":
            raise FDDError("memorization compares the training split with a held-out one: "
                           "measure against --split test (or val)")
        object.__setattr__(self, "synthetic", check_named_uris(self.synthetic, error=FDDError))
        if not self.synthetic:
            raise FDDError("give at least one synthetic set (NAME=URI)")
        if self.classes is not None:
            object.__setattr__(self, "classes", validate_classes(self.classes))
        if self.max_per_class is not None and self.paper_protocol:
            raise FDDError("give max_per_class or paper_protocol, not both")
        if self.max_per_class is not None and self.max_per_class < 2:
            raise FDDError(f"max_per_class must be >= 2 (a covariance needs 2 images), got {self.max_per_class}")
        if self.batch_rows < 1 or self.inference_batch < 1 or (self.workers or 1) < 1:
            raise FDDError("batch_rows, inference_batch and workers must be >= 1")

    def wanted(self, classes: Sequence[str],
               real: Mapping[str, int] | None = None) -> dict[str, int] | None:
        """Rows asked per class, of every side; None: every row.

        With the paper protocol and the real split's rows per class (``real``), the paper's
        count or the real split's where it holds fewer: every side then draws the same count
        (a Fréchet distance between sets of unequal sizes carries their unequal bias), and a
        synthetic set's result does not depend on which other sets share the run.
        """
        if self.paper_protocol:
            return {c: min(PAPER_PROTOCOL[c], int((real or {}).get(c, PAPER_PROTOCOL[c])))
                    for c in classes}
        if self.max_per_class is not None:
            return dict.fromkeys(classes, self.max_per_class)
        return None


# --------------------------------------------------------------------------------------------
# The real-side cache


def _cache_identity(config: FDDConfig, artifact: Any, manifest_sha: str,
                    classes: Sequence[str], wanted: Mapping[str, int] | None) -> dict[str, Any]:
    """What the real-side statistics depend on; its hash names the cache file."""
    return {"kind": "fdd-real", "format": CACHE_FORMAT, "real_manifest_sha256": manifest_sha,
            "split": config.split, "classes": list(classes), "sampling": dict(wanted or {}),
            "classifier_sha256": artifact.sha256, "preprocessing": artifact.preprocessing.to_dict(),
            "feature_dim": artifact.model.feature_dim, "half_salt": HALF_SALT}


def _check_cache(stats: FeatureStats, identity: Mapping[str, Any], source: str) -> None:
    """Refuse statistics made from other features or other images, naming the difference."""
    if stats.dim != identity["feature_dim"]:
        raise FDDError(f"{source} holds features of dimension {stats.dim}, but the classifier makes "
                       f"{identity['feature_dim']}: it was made by another classifier; delete it or "
                       "point --real-stats elsewhere")
    for key, what in (("classifier_sha256", "classifier"), ("preprocessing", "preprocessing"),
                      ("real_manifest_sha256", "real shard set"), ("split", "split"),
                      ("classes", "class selection"), ("sampling", "sampling"),
                      ("half_salt", "half split")):
        if stats.meta.get(key) != identity[key]:
            raise FDDError(f"{source} was made with another {what} ({stats.meta.get(key)!r} instead "
                           f"of {identity[key]!r}); delete it or point --real-stats elsewhere")


def _load_cache(location: Location, identity: Mapping[str, Any]) -> SideStats | None:
    """The cached real side, checked against what is asked; None when there is none yet."""
    if not location.exists():
        return None
    try:
        stats = FeatureStats.from_bytes(location.read_bytes(), source=location.uri)
    except ValueError as error:  # not a statistics file of ours: the user pointed at it
        raise FDDError(f"{error}; delete it or point --real-stats elsewhere") from None
    _check_cache(stats, identity, location.uri)
    return SideStats(stats)


# --------------------------------------------------------------------------------------------
# The evaluation


def _manifest(uri: str, s3_endpoint: str | None) -> tuple[shards.Manifest, str]:
    """A verified manifest and the sha256 of its bytes (the shard set's fingerprint)."""
    root = resolve(uri, s3_endpoint)
    check_readable(root, "shard folder")
    manifest = shards.read_manifest(root)
    return manifest, hashlib.sha256(shards.manifest_location(root, note=False).read_bytes()).hexdigest()


def _choose_classes(config: FDDConfig, sides: Mapping[str, Mapping[str, int]]) -> tuple[str, ...]:
    """The evaluated classes; a class asked for but absent from a side is an error."""
    if config.classes is not None:
        if config.paper_protocol and (extra := [c for c in config.classes if c not in PAPER_PROTOCOL]):
            raise FDDError(f"the paper protocol has no count for {', '.join(extra)}; "
                           f"it covers {', '.join(PAPER_PROTOCOL)}")
        for side, counts in sides.items():
            empty = [c for c in config.classes if counts.get(c, 0) == 0]
            if empty:
                raise FDDError(f"no rows of class {', '.join(empty)} in {side}; "
                               "choose other --classes or another split")
        return config.classes
    candidates = PAPER_PROTOCOL if config.paper_protocol else validate_classes(None)
    classes = tuple(c for c in candidates if all(counts.get(c, 0) > 0 for counts in sides.values()))
    if not classes:
        raise FDDError("no class has rows on every side (" + "; ".join(
            f"{side}: {', '.join(c for c, n in counts.items() if n) or 'none'}"
            for side, counts in sides.items()) + ")")
    return classes


@dataclass(frozen=True)
class FDDInputs:
    """What an evaluation reads before measuring: the classifier and every side's manifest."""

    artifact: Any  # the loaded ClassifierArtifact
    files: ArtifactFiles  # its files, shipped to the feature actors
    real: shards.Manifest
    real_sha: str  # sha256 of the real manifest's bytes
    synthetic: dict[str, shards.Manifest]  # per synthetic set name
    classes: tuple[str, ...]
    wanted: dict[str, int] | None  # rows per class of every side; None: all


def run_fdd(config: FDDConfig, log: Callable[[str], None] = print, *,
            inputs: FDDInputs | None = None) -> dict[str, Any]:
    """Measure every synthetic set against the real split; write fdd.json/csv/md to ``out``.

    ``inputs``: what :func:`prepare_fdd` read (a job calls it before Ray starts); None reads
    them here.
    """
    inputs = inputs or prepare_fdd(config, log)
    out = resolve(config.out, config.s3_endpoint)
    real_side, measured, cache, cache_hit, rows = _measure(config, inputs, out, log)
    result = _result(config, inputs, real_side, measured, rows, cache.uri, cache_hit, log)
    write_outputs(result, out)
    log(f"[fdd] wrote {', '.join(out.join(name).uri for name in OUTPUTS)}")
    return result


def prepare_fdd(config: FDDConfig, log: Callable[[str], None] = print) -> FDDInputs:
    """Every check that needs no cluster (a job runs it before Ray starts): the classifier
    first, so a broken artifact fails before any data is read; then the manifests, the
    evaluated classes and the rows drawn per class."""
    files = read_classifier_files(config.classifier, config.s3_endpoint)
    artifact = load_classifier_artifact(files)
    real, real_sha = _manifest(config.real, config.s3_endpoint)
    if config.split not in real.counts:
        raise FDDError(f"{config.real} has no split {config.split!r} (it holds {', '.join(real.counts)})")
    if "memorization" in config.metrics and not sum(real.counts.get("train", {}).values()):
        raise FDDError(f"the memorization metric compares synthetic images with the real training "
                       f"split, but {config.real} has no rows in split 'train'; drop memorization "
                       "from --metrics")
    synthetic = {name: _manifest(uri, config.s3_endpoint)[0] for name, uri in config.synthetic}
    sides = {f"{config.real} (split {config.split})": real.counts[config.split]}
    sides.update({f"{uri} ({name})": synthetic[name].counts.get(shards.SYNTHETIC_SPLIT, {})
                  for name, uri in config.synthetic})
    classes = _choose_classes(config, sides)
    wanted = config.wanted(classes, real.counts[config.split])
    if config.paper_protocol:
        _require_paper_counts(wanted, synthetic)
    log(f"[fdd] classes: {', '.join(classes)}; " + ("all rows" if wanted is None else
        "per class at most " + ", ".join(f"{c} {n}" for c, n in wanted.items())))
    return FDDInputs(artifact, files, real, real_sha, synthetic, classes, wanted)


def _measure(config: FDDConfig, inputs: FDDInputs, out: Location,
             log: Callable[[str], None]
             ) -> tuple[SideStats, list[SideStats], Location, bool, registry.EvaluationRows]:
    """``(real side, synthetic sides, cache location, cache hit, bank rows)``: every side's
    rows from its feature bank (built where missing, in one pipeline), the real side's
    statistics from their cache when it holds them."""
    classes, wanted = inputs.classes, inputs.wanted
    identity = _cache_identity(config, inputs.artifact, inputs.real_sha, classes, wanted)
    if config.real_stats:
        cache = resolve(config.real_stats, config.s3_endpoint)
    else:
        key = shards.fingerprint(identity)[:16]
        cache = resolve(config.cache_dir, config.s3_endpoint) if config.cache_dir else out.join("cache")
        cache = cache.join(f"real-{key}.npz")
    real_side = _load_cache(cache, identity)
    log(f"[fdd] real-side statistics {'reused from' if real_side else 'will be cached in'} {cache.uri}")

    def request(uri: str, split: str, counts: Mapping[str, int]) -> BankRequest:
        available = {c: int(counts.get(c, 0)) for c in classes}
        return BankRequest(uri, split, tuple(classes), sample_thresholds(
            uri, split=split, available=available, wanted=wanted, salt=SAMPLE_SALT,
            s3_endpoint=config.s3_endpoint))

    requests = [request(config.real, config.split, inputs.real.counts[config.split])]
    requests += [request(uri, shards.SYNTHETIC_SPLIT, inputs.synthetic[name].counts[shards.SYNTHETIC_SPLIT])
                 for name, uri in config.synthetic]
    memorization = "memorization" in config.metrics
    if memorization:  # every row of the training split: a copy may be of any training image
        train = inputs.real.counts.get("train", {})
        requests.append(BankRequest(config.real, "train", tuple(c for c in inputs.real.classes if train.get(c)), {}))
    compute = BankCompute(batch_rows=config.batch_rows, inference_batch=config.inference_batch,
                          workers=config.workers, use_gpu=config.use_gpu,
                          cpus_per_worker=config.cpus_per_worker, s3_endpoint=config.s3_endpoint)
    fallback = (resolve(config.cache_dir, config.s3_endpoint) if config.cache_dir else out.join("cache")).join("banks")
    banks = ensure_banks(requests, artifact=inputs.artifact, files=inputs.files, compute=compute,
                         bank_dir=config.bank_dir, fallback_dir=fallback.uri, log=log)
    known = inputs.artifact.classes
    rows = registry.EvaluationRows(
        tuple(classes), tuple(known), banks[0].load(thumbs=memorization, classes=classes),
        {name: bank.load(thumbs=memorization, classes=classes)
         for (name, _), bank in zip(config.synthetic, banks[1:])},
        banks[-1].load(thumbs=True) if memorization else None,
        seed=config.seed, bootstrap_reps=config.bootstrap_reps)
    measured = [side_stats(arrays, classes, halves=False) for arrays in rows.synthetic.values()]
    cache_hit = real_side is not None
    if not cache_hit:
        real_side = side_stats(rows.real, classes, halves=True)
        cache.write_bytes(real_side.stats.to_bytes(**identity))
    return real_side, measured, cache, cache_hit, rows


def _distances(config: FDDConfig, classes: Sequence[str], real_stats: FeatureStats,
               halves: Sequence[FeatureStats], measured: Sequence[SideStats],
               log: Callable[[str], None]) -> tuple[dict, dict]:
    """``(floor, rows)``: the real Gaussian of each class factorised once, every synthetic set
    measured against it, and the floor between the real split's patient halves."""
    _require_two(real_stats, classes, f"{config.real} (split {config.split})")
    references = {c: prepare_reference(*real_stats.mean_cov(c)) for c in classes}
    floor = {c: (frechet_distance(*halves[0].mean_cov(c), *halves[1].mean_cov(c))
                 if min(h.count(c) for h in halves) >= 2 else None) for c in classes}
    rows = {}
    for (name, uri), stats in zip(config.synthetic, measured):
        _require_two(stats.stats, classes, uri)
        rows[name] = {
            "uri": uri,
            "n": {c: stats.stats.count(c) for c in classes},
            "fdd": {c: references[c].distance(*stats.stats.mean_cov(c)) for c in classes},
        }
        log(f"[fdd] {name}: " + ", ".join(f"{c} {v:.3f}" for c, v in rows[name]["fdd"].items()))
    return floor, rows


def _result(config: FDDConfig, inputs: FDDInputs, real_side: SideStats, measured: Sequence[SideStats],
            bank_rows: registry.EvaluationRows, statistics_uri: str, cache_hit: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The distances, the warnings and the record of what was measured: fdd.json's content."""
    artifact, classes, wanted = inputs.artifact, inputs.classes, inputs.wanted
    real_stats, halves = real_side.by_class(), [real_side.by_class(h) for h in HALVES]
    floor, rows = _distances(config, classes, real_stats, halves, measured, log)
    sizes = {f"real ({config.split})": {c: real_stats.count(c) for c in classes},
             **{name: row["n"] for name, row in rows.items()}}
    short = _under_paper_counts(config, wanted)
    notes = ([short] if short else []) + _rank_notes(sizes, artifact.model.feature_dim)
    for note in notes:
        log(f"[fdd] warning: {note}")
    result = {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(),
        "metric": "FDD: squared Fréchet distance between Gaussians of the classifier's pooled "
                  "features of real and synthetic images of one class (lower is better)",
        "classes": list(classes),
        "classifier": {"path": config.classifier, "sha256": artifact.sha256,
                       "classes": list(artifact.classes), "feature_dim": artifact.model.feature_dim,
                       "preprocessing": artifact.preprocessing.to_dict()},
        "sampling": ({"paper_protocol": wanted,
                      "paper_counts": {c: PAPER_PROTOCOL[c] for c in classes}} if config.paper_protocol else
                     {"max_per_class": config.max_per_class} if wanted else None),
        "real": {"uri": config.real, "split": config.split, "manifest_sha256": inputs.real_sha,
                 "n": sizes[f"real ({config.split})"],
                 "n_halves": {c: [h.count(c) for h in halves] for c in classes},
                 "statistics": statistics_uri, "statistics_reused": cache_hit},
        "floor": floor,
        "synthetic": rows,
        "warnings": notes,
    }
    _add_metrics(result, config.metrics, bank_rows, log)
    _add_means(result)
    return result


def _add_metrics(result: dict[str, Any], names: Sequence[str], rows: registry.EvaluationRows,
                 log: Callable[[str], None]) -> None:
    """Each selected registry metric's per-class values under its name in every synthetic
    row (FDD's excess under ``fdd_excess``; FDD itself comes from the exact statistics), its
    settings under ``metrics``."""
    result["metrics"] = {"selected": list(names)}
    for name, measured in registry.compute(names, rows).items():
        key = "fdd_excess" if name == "fdd" else name
        for set_name, values in measured.per_set.items():
            result["synthetic"][set_name][key] = values
        if name == "class_consistency":  # the same classifier on the real split: the reference
            result["real"]["class_consistency"] = measured.info.pop("real")
        result["metrics"][name] = measured.info
        log(f"[fdd] {name} measured")


def _require_paper_counts(wanted: Mapping[str, int], synthetic: Mapping[str, shards.Manifest]) -> None:
    """Every synthetic set holds at least the count the real side draws (equal counts)."""
    for name, manifest in synthetic.items():
        held = manifest.counts.get(shards.SYNTHETIC_SPLIT, {})
        short = {c: int(held.get(c, 0)) for c, n in wanted.items() if held.get(c, 0) < n}
        if short:
            raise FDDError(
                f"synthetic set {name} holds fewer images than the paper protocol draws: "
                + ", ".join(f"{c} {n} of {wanted[c]}" for c, n in short.items())
                + f"; make at least {max(wanted[c] for c in short)} per class "
                "(jobs/synthesize.py --target-per-class)")


def _under_paper_counts(config: FDDConfig, wanted: Mapping[str, int] | None) -> str | None:
    """The one warning that names the classes drawn below the paper's count, if any."""
    if not config.paper_protocol or wanted is None:
        return None
    short = [f"{c} {n} of {PAPER_PROTOCOL[c]}" for c, n in wanted.items() if n < PAPER_PROTOCOL[c]]
    if not short:
        return None
    return (f"the real split holds fewer images than the paper's count for {len(short)} class(es) "
            f"({', '.join(short)}): every side draws that smaller count, so the table compares "
            "equal counts, but not the paper's")


def _rank_notes(counts: Mapping[str, Mapping[str, int]], dim: int) -> list[str]:
    """One line per side whose classes have no more images than feature dimensions."""
    notes = []
    for side, per_class in counts.items():
        few = {c: n for c, n in per_class.items() if n <= dim}
        if few:
            notes.append(f"{side}: {len(few)} class(es) with at most {max(few.values())} images "
                         f"(fewest: {min(few.values())}) for {dim} feature dimensions; their "
                         "covariances are rank-deficient and FDD is biased upwards, so compare "
                         "only numbers made with equal counts")
    return notes


def _require_two(stats: FeatureStats, classes: Sequence[str], source: str) -> None:
    few = [f"{c} ({stats.count(c)})" for c in classes if stats.count(c) < 2]
    if few:
        raise FDDError(f"{source}: a covariance needs at least 2 images per class; "
                       f"too few for {', '.join(few)}")


def _mean(values: Iterable[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _add_means(result: dict[str, Any]) -> None:
    """Macro averages over the classes (the paper reports per class; a mean helps ranking)."""
    result["floor_mean"] = _mean(result["floor"].values())
    result["real"]["class_consistency_mean"] = _mean(result["real"]["class_consistency"].values())
    for row in result["synthetic"].values():
        row["fdd_mean"] = _mean(row["fdd"].values())
        row["class_consistency_mean"] = _mean(row["class_consistency"].values())

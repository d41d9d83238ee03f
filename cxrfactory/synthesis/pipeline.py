"""The synthetic dataset factory: class-balanced synthetic X-rays as Parquet shards, on Ray Data.

    config = SynthesisConfig(generator="runs/demo/generator", out="s3://bucket/cxr-synth",
                             target_per_class=20_000)
    manifest = synthesize(config)

How it runs:

1. **Plan** (driver): per class ``N``, or ``N`` minus its real count in ``balance_against``
   (never below 0), cut into work items, one per output file: ``(class, [start, stop))``.
   With ``exclude_flagged``, the images memorization audits flagged are skipped and replaced
   by the next indices' (:mod:`~cxrfactory.synthesis.exclusions`); an item lists its skips.
2. **Generate and write** (Ray Data): ``map_batches`` with :class:`ShardWriter`, an actor
   holding the generator (on a GPU when the cluster has them), one work item per call: it
   generates in batches, encodes PNGs and writes the file itself, atomically. One call per
   file: files are whole or absent, and a rerun writes only the missing ones.
3. **Manifest** (driver), last, with counts read back from the files' footers.

Determinism (docs/architecture.md, "Seeds"): image ``i`` of class ``k`` has the seed
``image_seed(run_seed, k, i)`` and its noise depends on that seed alone; a file's batches are
cut from its own start, so the bytes depend on (generator, seed, rows per file, batch size,
excluded images) and never on the number of workers or the order they finish in.
:func:`regenerate` remakes a row's image from its seed.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cxrfactory.dataset_card import finish_set
from cxrfactory import filenames
from cxrfactory import labels as L
from cxrfactory import shards
from cxrfactory.gan.artifact import GeneratorArtifact, load_generator_artifact, read_generator_files
from cxrfactory.models.sampling import generate
from cxrfactory.storage import Location, check_writable, resolve
from cxrfactory.weights import ArtifactFiles
from cxrfactory.synthesis.exclusions import Exclusions, exclusion_summary, load_exclusions
from cxrfactory.synthesis.plan import (
    ClassPlan,
    SynthesisConfig,
    SynthesisError,
    WorkItem,
    exclude_images,
    format_plan,
    image_seeds,
    plan_classes,
    plan_work,
    real_counts,
)
from cxrfactory.synthesis.rows import SOURCE, encode_image, synthetic_rows

GPU_WORKER_MAX_CPUS = 8.0  # default CPUs (PNG encoding threads) of a GPU actor, at most


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class ShardWriter:
    """Ray Data callable class: holds the generator, turns one work item into one shard file.

    ``artifact`` is the generator artifact's files as bytes, read and verified once on the
    driver (:func:`~cxrfactory.gan.artifact.read_generator_files`), so any node can build the
    network without a shared filesystem; a loaded :class:`GeneratorArtifact` runs the class in
    a plain process (tests, benchmarks).
    """

    def __init__(self, *, artifact: ArtifactFiles | GeneratorArtifact, out: str,
                 s3_endpoint: str | None, seed: int, resolution: int, batch_size: int,
                 threads: int, use_gpu: bool) -> None:
        # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs this actor was given instead.
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if isinstance(artifact, ArtifactFiles):
            artifact = load_generator_artifact(artifact)
        self.generator = artifact.generator.eval().to(self.device)
        self.sha256 = artifact.sha256
        self.root = resolve(out, s3_endpoint)
        self.seed, self.resolution, self.batch_size = seed, resolution, batch_size
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="png")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"path": [], "label": [], "rows": [], "seconds": [], "pid": [],
                                "cpu_seconds": [], "peak_rss_mb": []}
        for i in range(len(batch["path"])):  # one item per call (batch_size=1), but stay general
            started = time.perf_counter()
            path, label = str(batch["path"][i]), str(batch["label"][i])
            skip = tuple(int(j) for j in str(batch["skip"][i]).split()) if "skip" in batch else ()
            rows = self.make_rows(label, int(batch["class_index"][i]), int(batch["start"][i]),
                                  int(batch["stop"][i]), skip)
            shards.write_shard(self.root.join(path), shards.make_table(rows))
            # cpu_seconds: this actor's CPU time so far (start-up included), for the benchmarks.
            for key, value in (("path", path), ("label", label), ("rows", len(rows)),
                               ("seconds", time.perf_counter() - started), ("pid", os.getpid()),
                               ("cpu_seconds", time.process_time()), ("peak_rss_mb", peak_rss_mb())):
                out[key].append(value)
        return out

    def make_rows(self, label: str, class_index: int, start: int, stop: int,
                  skip: tuple[int, ...] = ()) -> list[dict[str, Any]]:
        """Rows of images ``[start, stop)`` of a class less ``skip``, batches cut from ``start``.

        PNG encoding (and resizing) runs on a thread pool while the generator makes the next
        batch: PIL releases the GIL there, and on a GPU encoding one image costs several times
        more than generating it (BENCHMARKS.md).
        """
        seeds = image_seeds(self.seed, class_index, start, stop, skip)
        pngs = []
        for first in range(0, len(seeds), self.batch_size):
            chunk = seeds[first:first + self.batch_size]
            images = generate(self.generator, [class_index] * len(chunk), chunk, device=self.device,
                              batch_size=len(chunk))  # (B, H, W) uint8
            pngs += [self.pool.submit(encode_image, img, self.resolution) for img in images]
        return synthetic_rows(label, seeds, [f.result() for f in pngs], self.resolution, self.sha256)


def actor_resources(config: SynthesisConfig) -> dict[str, Any]:
    """``num_cpus``, ``num_gpus`` and torch threads of each actor, from the cluster's resources.

    GPU actors when asked for and the cluster has GPUs; otherwise CPU actors that share the
    CPUs (fractions allowed, so more actors than CPUs still start instead of waiting forever).
    """
    import ray

    total = ray.cluster_resources()
    node_cpus = max([n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")] or [1.0])
    if config.gpus_per_worker > 0 and total.get("GPU", 0) > 0:
        if config.gpus_per_worker * config.workers > total["GPU"]:
            raise SynthesisError(f"{config.workers} workers x {config.gpus_per_worker} GPU exceed "
                                 f"the cluster's {total['GPU']:g} GPU(s); lower --workers")
        # The CPUs encode PNGs: on an H200 one thread keeps up with a fifth of the generator,
        # eight with 0.7 of it (BENCHMARKS.md).
        cpus = config.cpus_per_worker or min(GPU_WORKER_MAX_CPUS, node_cpus,
                                             total.get("CPU", 1.0) / config.workers)
        return {"num_cpus": cpus, "num_gpus": config.gpus_per_worker, "threads": max(1, int(cpus)),
                "use_gpu": True}
    cpus = config.cpus_per_worker or min(node_cpus, total.get("CPU", 1.0) / config.workers)
    return {"num_cpus": cpus, "num_gpus": 0, "threads": max(1, int(cpus)), "use_gpu": False}


# ---------------------------------------------------------------------------------------------
# The job


@dataclass
class PipelineStats:
    """What the Ray pipeline of one invocation did (the files a resumed run skipped not included)."""

    files: int
    images: int
    seconds: float  # wall time from submitting the pipeline to its last file (start-up included)
    worker_seconds: float  # time the actors spent making files, summed over files
    worker_cpu_seconds: float  # CPU time of the actor processes, start-up included, summed over actors
    peak_worker_rss_mb: float  # the largest peak resident memory any generator actor reported

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class SynthesisRun:
    """A validated, planned run whose output folder is ready: what :func:`run_synthesis` needs."""

    config: SynthesisConfig
    artifact: GeneratorArtifact
    files: ArtifactFiles  # the artifact's files, verified: what the actors receive
    out: Location
    resolution: int  # output side in px
    plan: list[ClassPlan]  # per class, vocabulary order
    items: list[WorkItem]  # every file of the finished dataset
    todo: list[WorkItem]  # the files still missing
    identity: dict[str, Any]  # what the output's fingerprint is made of
    complete: shards.Manifest | None  # the manifest when the folder is already finished
    stats: PipelineStats | None = None  # set by run_synthesis once the pipeline ran
    exclusions: Exclusions | None = None  # the audits' flagged images (exclude_flagged)


def prepare_synthesis(config: SynthesisConfig, *, log: Callable[[str], None] = print) -> SynthesisRun:
    """Validate, plan, print the plan table and make the output ready (no Ray needed).

    Every check on user input happens here, before the output is touched, so bad input leaves
    nothing behind; an output holding another run's rows is refused unless ``overwrite``.
    """
    files = read_generator_files(config.generator, s3_endpoint=config.s3_endpoint)
    artifact = load_generator_artifact(files)
    classes = L.validate_classes(config.classes, artifact.classes)
    resolution = config.resolution or artifact.resolution
    real = None
    if config.balance_against is not None:
        real = real_counts(config.balance_against, config.split, config.s3_endpoint)
    plan = plan_classes(classes, artifact.classes, config.target_per_class, real)
    exclusions = None
    if config.exclude_flagged:
        exclusions = load_exclusions(config.exclude_flagged, classes=classes,
                                     vocabulary=artifact.classes, generator_sha256=artifact.sha256,
                                     seed=config.seed, s3_endpoint=config.s3_endpoint)
        plan = exclude_images(plan, config.seed, exclusions.image_ids)
    items = plan_work(plan, config.rows_per_file)
    out = resolve(config.out, config.s3_endpoint)
    check_writable(out)

    log(f"[synthesize] generator {artifact.sha256[:12]}… ({artifact.resolution} px, "
        f"{len(artifact.classes)} classes) -> {out.uri} at {resolution} px, seed {config.seed}")
    if config.balance_against is not None:
        log(f"[synthesize] balancing against {config.balance_against} split {config.split!r}: "
            f"real + synthetic = {config.target_per_class} per class")
    if exclusions is not None:
        log(f"[synthesize] {exclusion_summary(exclusions, plan)}")
    log(format_plan(plan))

    # Batch size and worker count are not part of the identity: a run stopped on one machine
    # may be completed on another with other batches and workers.
    identity = {
        "kind": "synthesize", "generator": artifact.sha256, "seed": config.seed,
        "resolution": resolution, "rows_per_file": config.rows_per_file,
        "classes": list(classes), "target_per_class": config.target_per_class,
        "plan": [[p.label, p.real, p.to_generate] for p in plan],
    }
    if exclusions is not None:  # only then: the fingerprints of earlier runs stay as they were
        identity["excluded"] = sorted(exclusions.image_ids)
    if not config.overwrite:
        _refuse_another_run(out, identity)
    state = shards.prepare_output(out, identity, overwrite=config.overwrite)
    todo = [item for item in items if item.path not in state["existing"]]
    return SynthesisRun(config, artifact, files, out, resolution, plan, items, todo, identity,
                        state["complete"], exclusions=exclusions)


def _refuse_another_run(out: Location, identity: dict[str, Any]) -> None:
    """Say what differs (generator, seed, ...) when ``out`` holds another finished run.

    :func:`shards.prepare_output` refuses such a folder too, but without naming the difference;
    the identity of the run that made the folder is still in its ``_plan.json``.
    """
    plan_loc = out.join(filenames.PLAN)
    if not (out.join(filenames.MANIFEST).exists() and plan_loc.exists()):
        return
    previous = json.loads(plan_loc.read_text())
    if previous.get("fingerprint") != shards.fingerprint(identity):
        raise shards.OutputConflictError(
            f"{out.uri} already holds a finished dataset made with other settings "
            f"({shards._describe_difference(previous.get('identity', {}), identity)}); "
            "choose another output or pass --overwrite to replace it")


def run_synthesis(run: SynthesisRun, *, log: Callable[[str], None] = print,
                  stop_after_files: int | None = None) -> shards.Manifest | None:
    """Write the missing files on Ray Data, then the manifest; returns the manifest.

    ``stop_after_files`` writes only that many of the missing files and returns None without a
    manifest, as a stopped run would (tests and benchmarks use it).
    """
    if run.complete is not None:
        log(f"[synthesize] {run.out.uri} is already complete; nothing to do")
        log(format_plan(run.plan, written=run.complete.class_counts(shards.SYNTHETIC_SPLIT)))
        return run.complete
    log(f"[synthesize] {len(run.items)} file(s) planned, {len(run.items) - len(run.todo)} "
        f"already written, {len(run.todo)} to write")
    todo = run.todo if stop_after_files is None else run.todo[:stop_after_files]
    if todo:
        run.stats = _run_pipeline(run, todo, log)
    if stop_after_files is not None:
        return None

    manifest = _manifest_from_shards(run)
    finish_set(run.out, manifest)
    log(f"[synthesize] {run.out.uri}: {manifest.total()} synthetic images in {len(run.items)} file(s)")
    log(format_plan(run.plan, written=manifest.class_counts(shards.SYNTHETIC_SPLIT)))
    return manifest


def synthesize(config: SynthesisConfig, *, log: Callable[[str], None] = print,
               stop_after_files: int | None = None) -> shards.Manifest | None:
    """:func:`prepare_synthesis` then :func:`run_synthesis` (Ray must be up, or starts locally)."""
    return run_synthesis(prepare_synthesis(config, log=log), log=log,
                         stop_after_files=stop_after_files)


def _run_pipeline(run: SynthesisRun, todo: list[WorkItem], log: Callable[[str], None]) -> PipelineStats:
    """Write the files of ``todo`` with a Ray Data actor pool, logging each finished file."""
    import ray

    config, out = run.config, run.out
    res = actor_resources(config)
    if config.gpus_per_worker > 0 and not res["use_gpu"]:
        log("[synthesize] the cluster has no GPU: running the generator on CPU actors")
    ds = ray.data.from_items([item.as_row() for item in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        ShardWriter,
        fn_constructor_kwargs={
            "artifact": run.files, "out": out.uri, "s3_endpoint": out.s3_endpoint,
            "seed": config.seed, "resolution": run.resolution, "batch_size": config.batch_size,
            "threads": res["threads"], "use_gpu": res["use_gpu"],
        },
        batch_size=1,
        batch_format="numpy",
        # Files are seconds of work each: queueing two per actor hides the scheduling gap
        # without letting one actor hoard the tail of the plan.
        compute=ray.data.ActorPoolStrategy(size=config.workers, max_tasks_in_flight_per_actor=2),
        num_cpus=res["num_cpus"],
        num_gpus=res["num_gpus"] or None,
    )
    total = sum(item.rows for item in todo)
    done_files, done_rows, busy, peak_rss = 0, 0, 0.0, 0.0
    cpu_by_actor: dict[int, float] = {}
    started = time.perf_counter()
    log(f"[synthesize] {config.workers} {'GPU' if res['use_gpu'] else 'CPU'} worker(s), "
        f"{res['num_cpus']:g} CPU(s) and {res['threads']} thread(s) each; {total} images to make")
    for summary in ds.iter_rows():
        done_files += 1
        done_rows += int(summary["rows"])
        elapsed = time.perf_counter() - started
        busy += float(summary["seconds"])
        peak_rss = max(peak_rss, float(summary["peak_rss_mb"]))
        pid = int(summary["pid"])
        cpu_by_actor[pid] = max(cpu_by_actor.get(pid, 0.0), float(summary["cpu_seconds"]))
        log(f"[synthesize] {done_files}/{len(todo)} files, {done_rows}/{total} images "
            f"({100 * done_rows / total:.0f}%), {done_rows / elapsed:.1f} images/s: "
            f"{summary['path']}")
    stats = PipelineStats(done_files, done_rows, time.perf_counter() - started, busy,
                          sum(cpu_by_actor.values()), peak_rss)
    log(f"[synthesize] made {stats.images} images in {stats.seconds:.1f}s "
        f"({stats.images_per_second:.1f} images/s; actors busy {busy:.1f}s, "
        f"{stats.worker_cpu_seconds:.1f} CPU-s); peak actor memory {peak_rss:.0f} MiB")
    return stats


def _manifest_from_shards(run: SynthesisRun) -> shards.Manifest:
    """Counts come from the files' footers, so the manifest states exactly what exists."""
    config, plan, items = run.config, run.plan, run.items
    return shards.manifest_from_shards(
        run.out, [(item.path, shards.SYNTHETIC_SPLIT) for item in items], source=SOURCE,
        classes=[p.label for p in plan], splits=(shards.SYNTHETIC_SPLIT,), config=config,
        expected_rows={item.path: item.rows for item in items},
        extra={
            "generator": run.artifact.sha256, "generator_uri": config.generator,
            "seed": config.seed, "target_per_class": config.target_per_class,
            "resolution": run.resolution,
            "plan": [{"class": p.label, "real": p.real, "to_generate": p.to_generate} for p in plan],
            "balance_against": (None if config.balance_against is None
                                else {"uri": config.balance_against, "split": config.split}),
            "fingerprint": shards.fingerprint(run.identity),
            "generator_run": {k: run.artifact.meta[k] for k in ("run_name", "step", "images_seen")
                              if k in run.artifact.meta},
            "command": config.command,
            **({"audit": run.exclusions.record(plan)} if run.exclusions is not None else {}),
        },
    )

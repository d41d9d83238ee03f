"""Distributed GAN training on Ray Train: the driver (:func:`train`) and the worker loop.

The driver checks everything a user can get wrong before Ray starts any worker (data, storage,
a checkpoint of another model), saves the resolved config, then runs a ``TorchTrainer``::

    result = train(config, RunOptions(data="shards/real", run_name="paper-1"))

Each worker runs :func:`train_worker`: build G and the discriminators from the same seed,
wrap each in its own DDP, resume from Ray Train's latest checkpoint, then feed
:class:`~cxrfactory.gan.step.GANTrainer` the ready tensors of its Ray Data shard. One step
is one global real batch (``train.batch_size`` images split over the workers).

What a run leaves in ``<storage>/<run_name>/``: Ray Train's ``checkpoint-<step>/`` directories
(``state.pt`` + ``config.json``, docs/architecture.md "Artifacts and checkpoints", the last ``keep_checkpoints``), ``config.json`` (the
resolved run), ``metrics.jsonl`` (one line per log interval; Ray Train V2 persists metrics only
with checkpoints, so rank 0 writes its own), ``loss_curves.png``, ``samples/step-<step>.png``
(one row per class, fixed noise, every branch) and at the end ``generator/``, the artifact
``jobs/synthesize.py`` consumes.

Resuming: after a worker failure (``FailureConfig(max_failures)``) and when a run is started
again with the same storage and name, Ray Train hands the latest checkpoint to
``get_checkpoint()``; the run continues from its step inside its epoch, so it ends at the
same final step as an uninterrupted run and ``metrics.jsonl`` is cut back to that step.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrfactory import filenames
from cxrfactory.errors import find_user_error
from cxrfactory.gan.artifact import save_generator_artifact
from cxrfactory.gan.config import Config, ConfigError
from cxrfactory.models import build_discriminators, build_generator, noise_for_seeds
from cxrfactory.gan.plots import save_loss_curves, save_sample_grid
from cxrfactory.storage import Location, check_writable, resolve
from cxrfactory.gan import checkpoint as ckpt
from cxrfactory.gan.data import (
    EpochPlan,
    batch_to_tensors,
    build_train_dataset,
    plan_epochs,
    read_train_manifest,
)
from cxrfactory.gan.step import GANTrainer
from cxrfactory.gan.progress import MetricsLog, Progress, say



class TrainingError(RuntimeError):
    """Training stopped for a reason that is not a user mistake (reported with its cause)."""


class InjectedFault(RuntimeError):
    """Raised by the fault hook (``RunOptions.fault_at_step``) to test recovery."""


@dataclass(frozen=True)
class RunOptions:
    """Where a run reads and writes, and how Ray runs it (the model and schedule are in Config)."""

    data: str  # real shard root: local folder or s3://bucket/prefix
    run_name: str  # the run's folder below storage; the same name resumes
    storage: str = "runs"  # folder or s3:// URI holding <run_name>/
    s3_endpoint: str | None = None  # S3-compatible endpoint for data and storage (else CXRF_S3_ENDPOINT / AWS)
    max_failures: int = 2  # worker failures recovered from the last checkpoint before giving up
    keep_checkpoints: int = 3  # newest checkpoints kept in the run folder
    samples_per_class: int = 4  # columns per branch in each sample grid
    cpus_per_worker: float | None = None  # None: 1, or less so one CPU stays free for Ray Data
    torch_threads: int | None = None  # intra-op threads per worker; None: Ray's per-worker default
    fault_at_step: int | None = None  # TEST HOOK: every worker raises once, right after this step

    def __post_init__(self) -> None:
        if not self.run_name or "/" in self.run_name or self.run_name in (".", ".."):
            raise ConfigError(f"--run-name must be a plain folder name, got {self.run_name!r}")
        if self.max_failures < 0 or self.keep_checkpoints < 1 or self.samples_per_class < 1:
            raise ConfigError("max_failures >= 0, keep_checkpoints >= 1 and samples_per_class >= 1 required")


@dataclass(frozen=True)
class RunPlan:
    """A validated run: config, options, the epoch plan and what the run folder already holds."""

    config: Config
    options: RunOptions
    epochs: EpochPlan
    run_uri: str
    resume_step: int | None  # step of the checkpoint the run will resume from, if any

    @property
    def total_steps(self) -> int:
        steps = self.epochs.steps_per_epoch * self.config.train.epochs
        return min(steps, self.config.train.max_steps or steps)


@dataclass
class TrainResult:
    """What :func:`train` returns (the final report of rank 0)."""

    run_uri: str
    step: int
    epoch: int
    images_seen: int
    artifact_uri: str
    checkpoint_uri: str | None
    resumed_from: int | None  # step the last attempt started from (None: from scratch)
    param_digests: list[str]  # one per worker; equal when the replicas are in sync
    metrics: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Driver


def steps_between(images: int, global_batch: int) -> int:
    """A schedule in images -> steps of ``global_batch`` images (at least 1)."""
    return max(1, images // global_batch)


def prepare_run(config: Config, options: RunOptions) -> RunPlan:
    """Validate a run without Ray: data, storage, resumability. Raises on user mistakes."""
    manifest = read_train_manifest(options.data, options.s3_endpoint)
    epochs = plan_epochs(manifest, config.model.classes, class_balanced=config.train.class_balanced,
                         global_batch=config.train.batch_size, num_workers=config.train.num_workers,
                         data_uri=options.data)
    storage = resolve(options.storage, options.s3_endpoint)
    run = storage.join(options.run_name)
    check_writable(run)
    latest = ckpt.find_latest(run)
    resume_step = None
    if latest is not None:
        meta = json.loads(latest.join(filenames.CONFIG).read_text())
        ckpt.check_compatible(meta, config, where=f"run {options.run_name!r} ({latest.uri})")
        resume_step = int(meta["step"])
    return RunPlan(config, options, epochs, run.uri, resume_step)


def describe(plan: RunPlan) -> str:
    """The plan in a few lines, for the job's log."""
    e, t = plan.epochs, plan.config.train
    per_epoch = (f"class-balanced, {e.per_class} per class" if e.per_class is not None
                 else "natural class frequencies")
    counts = ", ".join(f"{c} {n}" for c, n in e.class_counts.items())
    return "\n".join([
        f"[train] run {plan.run_uri}" + (f" (resuming from step {plan.resume_step})"
                                         if plan.resume_step is not None else ""),
        f"[train] train split: {sum(e.class_counts.values())} images ({counts})",
        f"[train] epoch: {e.rows} images ({per_epoch}) = {e.steps_per_epoch} steps of {e.global_batch} "
        f"({e.worker_batch} per worker x {e.num_workers}); {t.epochs} epochs -> {plan.total_steps} steps"
        + (f" (max_steps {t.max_steps})" if t.max_steps else ""),
    ])


def train(config: Config, options: RunOptions, *, log: Callable[[str], None] = print,
          plan: RunPlan | None = None) -> TrainResult:
    """Run (or resume) a training run on Ray Train; returns rank 0's final report.

    Starts a local Ray unless one is up or ``RAY_ADDRESS`` names a cluster. User mistakes raise
    a :class:`~cxrfactory.errors.UserError` before any worker starts, and one met inside a
    worker (a full disk) comes back as itself; a run that still fails after
    ``options.max_failures`` recoveries raises :class:`TrainingError`.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cxrfactory.raydata import train_worker_resources
    from cxrfactory.runtime import init_ray

    plan = plan or prepare_run(config, options)
    log(describe(plan))
    run = resolve(plan.run_uri, options.s3_endpoint)
    _save_run_config(run, config, options, plan)
    init_ray()
    t = config.train
    if t.use_gpu and not ray.cluster_resources().get("GPU"):
        raise ConfigError("the config asks for GPUs (train.use_gpu) but the Ray cluster has none; "
                         "pass --no-use-gpu or run on a GPU cluster")
    dataset = build_train_dataset(options.data, plan.epochs, config.resolutions, seed=t.seed,
                                  s3_endpoint=options.s3_endpoint)
    storage = resolve(options.storage, options.s3_endpoint)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.to_dict(), "options": asdict(options),
                           "epochs": asdict(plan.epochs), "run_uri": plan.run_uri},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                     resources_per_worker=train_worker_resources(
                                         num_workers=t.num_workers, use_gpu=t.use_gpu,
                                         cpus_per_worker=options.cpus_per_worker)),
        run_config=RunConfig(
            name=options.run_name, storage_path=storage.path, storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=options.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=options.keep_checkpoints),
            # Our own progress lines say what happens; Ray's per-report INFO lines are noise.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        if (user_error := find_user_error(exc)) is not None:
            raise user_error from exc  # e.g. a full disk in a worker: one line, exit status 2
        raise TrainingError(f"training failed after {options.max_failures} recovery attempt(s): "
                            f"{_root_cause(exc)}") from exc
    m = dict(result.metrics or {})
    return TrainResult(
        run_uri=plan.run_uri, step=int(m["step"]), epoch=int(m["epoch"]), images_seen=int(m["images_seen"]),
        artifact_uri=run.join(filenames.GENERATOR).uri,
        checkpoint_uri=run.join(posixpath.basename(result.checkpoint.path)).uri if result.checkpoint else None,
        resumed_from=m.get("resumed_from"), param_digests=list(m.get("param_digests", [])), metrics=m,
    )


def _save_run_config(run: Location, config: Config, options: RunOptions, plan: RunPlan) -> None:
    """``<run>/config.json``: the resolved run, its options and its epoch plan."""
    run.join(filenames.CONFIG).write_text(json.dumps({
        "config": config.to_dict(), "classes": list(config.model.classes), "data": options.data,
        "run_name": options.run_name, "options": asdict(options),
        "epoch_plan": {"rows": plan.epochs.rows, "steps_per_epoch": plan.epochs.steps_per_epoch,
                       "per_class": plan.epochs.per_class, "class_counts": plan.epochs.class_counts},
        "total_steps": plan.total_steps,
    }, indent=2) + "\n")


def _root_cause(exc: BaseException) -> str:
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        return f"worker {rank}: {type(err).__name__}: {str(err).strip().splitlines()[-1]}"
    return str(exc).strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------
# Worker


@dataclass
class _Position:
    """Where training stands; saved in every checkpoint."""

    step: int = 0  # global batches done
    epoch: int = 0  # epoch in progress
    epoch_step: int = 0  # steps done inside it


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _param_digest(trainer: GANTrainer) -> str:
    """sha256 of every parameter of G, G_ema and the Ds (equal across in-sync replicas)."""
    import hashlib

    from cxrfactory.models import unwrap

    h = hashlib.sha256()
    for net in (unwrap(trainer.G), trainer.G_ema, *(unwrap(d) for d in trainer.Ds)):
        for p in net.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker entry point (one process per data-parallel replica)."""
    from cxrfactory.runtime import quiet_train_reports

    quiet_train_reports()
    _WorkerLoop(loop_config).run()


class _WorkerLoop:
    """One replica's training: build, distribute, resume, train, checkpoint, finish."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.config = config = Config.from_dict(loop_config["config"])
        self.options = RunOptions(**loop_config["options"])
        self.epochs = EpochPlan.from_dict(loop_config["epochs"])
        self.run_loc = resolve(loop_config["run_uri"], self.options.s3_endpoint)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.is_chief = self.rank == 0
        self.device = ray.train.torch.get_device()
        if self.options.torch_threads:
            torch.set_num_threads(self.options.torch_threads)
        if self.is_chief:
            say(f"[train] {self.world} worker(s) on {self.device}, {torch.get_num_threads()} torch thread(s) each")

        # Build: the same seed on every rank gives identical initial weights (DDP checks it too).
        torch.manual_seed(config.train.seed)
        G = build_generator(config)
        if config.train.synced_batchnorm:
            # Each GPU would otherwise normalise over batch_size / num_workers images (4 at the
            # paper's 16 on 4 GPUs); synced, every BatchNorm sees the global batch, as on one GPU.
            G = nn.SyncBatchNorm.convert_sync_batchnorm(G)
        G = G.to(self.device)
        Ds = [d.to(self.device) for d in build_discriminators(config)]

        # Distribute: G and every D in its own DDP. G's BatchNorm runs twice per iteration (D step
        # fakes, G step), so buffers stay local (broadcast_buffers=False); parameters are in sync.
        ddp = {"broadcast_buffers": False}
        G = ray.train.torch.prepare_model(G, parallel_strategy_kwargs=ddp)
        Ds = [ray.train.torch.prepare_model(d, parallel_strategy_kwargs=ddp) for d in Ds]
        self.trainer = GANTrainer(G, Ds, config.gan, device=self.device, world_size=self.world,
                                  seed=_rank_seed(config.train.seed, self.rank))

        t = config.train
        self.total_steps = min(self.epochs.steps_per_epoch * t.epochs, t.max_steps or 1 << 62)
        self.log_every = steps_between(t.log_every_images, t.batch_size)
        self.ckpt_every = steps_between(t.checkpoint_every_images, t.batch_size)
        self.pos, self.resumed_from, self.last_saved = _Position(), None, None
        # Fixed noise and one row per class for every sample grid of the run.
        n = self.options.samples_per_class
        self.sample_c = torch.eye(config.model.num_classes).repeat_interleave(n, dim=0)
        self.sample_z = noise_for_seeds(list(range(n)) * config.model.num_classes, config.model.z_dim)

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Continue from Ray Train's latest checkpoint (worker failure or a restarted run)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            state, meta = ckpt.read_checkpoint(directory, map_location=self.device)
        ckpt.check_compatible(meta, self.config)
        self.trainer.load_state_dict(state["trainer"])
        self.pos = _Position(int(state["step"]), int(state["epoch"]), int(state["epoch_step"]))
        if int(state["world_size"]) == self.world:
            ckpt.restore_rng_states({k: v[self.rank] for k, v in state["rng"].items()}, self.trainer.noise,
                                    self.device)
        else:  # another worker count: fresh per-rank streams, still a function of seed and step
            seed = _rank_seed(self.config.train.seed + self.pos.step, self.rank)
            self.trainer.noise.manual_seed(seed)
            torch.manual_seed(seed)
        self.resumed_from = self.last_saved = self.pos.step
        if self.is_chief:
            say(f"[train] resumed from step {self.pos.step} (epoch {self.pos.epoch}, "
                f"{self.pos.epoch_step} steps into it) of {self.run_loc.uri}")

    def arm_fault(self) -> bool:
        """Test hook: armed once per run, remembered by a marker file in the run folder."""
        if self.options.fault_at_step is None:
            return False
        marker = self.run_loc.join(f".fault-injected-at-{self.options.fault_at_step}")
        armed = not marker.exists()
        if self.world > 1:
            torch.distributed.barrier()  # everyone has looked before the marker appears
        if armed and self.is_chief:
            marker.write_text("armed\n")
        return armed

    # ------------------------------------------------------------------- train
    def run(self) -> None:
        import ray.train

        self.resume()
        fault_armed = self.arm_fault()
        self.metrics = MetricsLog(self.run_loc.join(filenames.METRICS), self.is_chief, self.pos.step)
        config, pos, trainer, epochs = self.config, self.pos, self.trainer, self.config.train.epochs
        progress = Progress(self.total_steps, config.train.batch_size, self.world, self.is_chief)
        shard = ray.train.get_dataset_shard("train")
        while pos.step < self.total_steps and pos.epoch < epochs:
            trainer.set_epoch(pos.epoch)
            todo = max(self.epochs.steps_per_epoch - pos.epoch_step, 0)
            batches = shard.iter_torch_batches(batch_size=self.epochs.worker_batch, drop_last=True,
                                               prefetch_batches=2)
            for _, batch in zip(range(todo), batches):
                reals, c = batch_to_tensors(batch, len(config.resolutions), config.model.num_classes, self.device)
                progress.begin(pos.step)
                started = time.perf_counter()
                out = trainer.train_step(reals, c)
                progress.add(out, time.perf_counter() - started)
                pos.step, pos.epoch_step = pos.step + 1, pos.epoch_step + 1
                if fault_armed and pos.step == self.options.fault_at_step:
                    raise InjectedFault(f"injected fault after step {pos.step} (test hook)")
                # Per-tick work after the hot path: metrics, then checkpoints.
                if pos.step % self.log_every == 0 or pos.step == self.total_steps:
                    self.metrics.append(progress.record(pos, epochs, trainer.tau, config.resolutions))
                else:
                    progress.heartbeat(pos, epochs, trainer.tau)
                if pos.step % self.ckpt_every == 0 and pos.step < self.total_steps:
                    self.save(final=False)
                if pos.step >= self.total_steps:
                    break
            if pos.epoch_step >= self.epochs.steps_per_epoch:
                pos.epoch, pos.epoch_step = pos.epoch + 1, 0
            elif pos.step < self.total_steps:
                raise TrainingError(f"epoch {pos.epoch} ended after {pos.epoch_step} of "
                                    f"{self.epochs.steps_per_epoch} steps: the data stream was shorter than planned")

        # The end: a last checkpoint and the artifact, unless a finished run was started again.
        if self.last_saved != pos.step or not self.run_loc.join(filenames.GENERATOR, filenames.SHA256).exists():
            self.save(final=True)
        else:
            ray.train.report(self._report(_gather(_param_digest(trainer), self.world)))

    # ------------------------------------------------------------- checkpoint
    def _report(self, digests: list[str]) -> dict[str, Any]:
        return {"step": self.pos.step, "epoch": self.pos.epoch, "images_seen": self.trainer.images_seen,
                "resumed_from": self.resumed_from, "param_digests": digests,
                "replicas_in_sync": len(set(digests)) == 1}

    def save(self, final: bool) -> None:
        """All ranks gather RNG states and parameter digests; rank 0 writes the checkpoint, the
        sample grid, the loss curves (and at the end the artifact); all ranks report (lockstep)."""
        import ray.train

        pos, trainer, run = self.pos, self.trainer, self.run_loc
        rngs = _gather(ckpt.rng_state_bytes(trainer.noise, self.device), self.world)
        report = self._report(_gather(_param_digest(trainer), self.world))
        tmp, checkpoint = None, None
        if self.is_chief:
            if not report["replicas_in_sync"]:
                say(f"[train] WARNING: replicas diverged at step {pos.step}: {report['param_digests']}")
            tmp = tempfile.mkdtemp(prefix="cxrf-ckpt-")
            state = {"step": pos.step, "epoch": pos.epoch, "epoch_step": pos.epoch_step, "tau": trainer.tau,
                     "images_seen": trainer.images_seen, "trainer": trainer.state_dict(), "world_size": self.world,
                     "rng": {k: [ckpt.as_uint8(r[k]) for r in rngs] for k in rngs[0]}}
            name = self.options.run_name
            ckpt.write_checkpoint(tmp, state, self.config, {"run_name": name, "data": self.options.data})
            save_sample_grid(trainer.sample(self.sample_c, self.sample_z), self.config.model.classes,
                             self.options.samples_per_class, run.join(filenames.SAMPLES, f"step-{pos.step:07d}.png"),
                             title=f"{name} step {pos.step} (epoch {pos.epoch}, tau {trainer.tau:g})")
            save_loss_curves(self.metrics.records, run.join(filenames.LOSS_CURVES), title=name)
            if final:
                report["artifact_sha256"] = digest = save_generator_artifact(
                    run.join(filenames.GENERATOR), trainer.prepare_ema(), self.config,
                    extra={"run_name": name, "step": pos.step, "images_seen": trainer.images_seen})
                say(f"[train] generator artifact {run.join(filenames.GENERATOR).uri} (sha256 {digest[:12]})")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=checkpoint, checkpoint_dir_name=ckpt.checkpoint_dir_name(pos.step))
        self.last_saved = pos.step
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

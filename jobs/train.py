"""Train the multi-scale conditional GAN on real shards with Ray Train.

    python jobs/train.py --data shards/real --run-name paper-1 [--storage runs|s3://bucket/runs]
        [--preset paper|demo|smoke | --config FILE] [--model stackgan|cdcgan] [--num-workers N]
        [--use-gpu | --no-use-gpu] [--epochs E] [--max-steps S] [--batch-size B]
        [--class-balanced | --no-class-balanced] [--checkpoint-every K] [--log-every K]
        [--seed S] [--set section.field=value ...] [--s3-endpoint URL] [--smoke]

On a laptop it starts a local Ray; under `ray job submit -- python jobs/train.py ...` it joins
the cluster. The config is resolved in one order: the preset (cxrfactory/configs/gan/, default
paper) or --config FILE, then --smoke's overlay (configs/gan/smoke.yaml), then the flags, then
--set; it is printed and saved as <storage>/<run-name>/config.json. Running the same command again resumes the run from
its last checkpoint; a checkpoint of another model config is refused.

--batch-size is the global batch (all workers together). --checkpoint-every and --log-every
count steps (global batches); they set train.checkpoint_every_images / log_every_images to
K x batch size, the config's image-based schedule.

Test hook: CXRF_FAULT_AT_STEP=k makes every worker raise once right after step k (remembered
by a marker file in the run folder), to exercise recovery from the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from cxrfactory.config import ConfigError, add_config_arguments, config_from_args, parse_overrides, preset_data  # noqa: E402
from cxrfactory.gan.config import GAN_ARCHITECTURES, KIND, Config  # noqa: E402
from cxrfactory.runtime import run_job  # noqa: E402
from cxrfactory.gan.loop import RunOptions, TrainingError, prepare_run, train  # noqa: E402

FAULT_ENV = "CXRF_FAULT_AT_STEP"
#: The preset a run starts from without --preset or --config.
DEFAULT_PRESET = "paper"
#: --smoke: this partial preset (a tiny model, two steps) on top of the chosen one.
SMOKE_OVERLAY = "smoke"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="real shard folder or s3://bucket/prefix (ingest_nih output)")
    p.add_argument("--run-name", required=True, help="run folder name below --storage; the same name resumes")
    p.add_argument("--storage", default="runs", help="folder or s3:// URI holding the runs (default ./runs)")
    add_config_arguments(p, KIND, default=DEFAULT_PRESET)
    p.add_argument("--model", choices=GAN_ARCHITECTURES, default=None, help="architecture (model.arch)")
    p.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (data-parallel)")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None, help="one GPU per worker")
    p.add_argument("--epochs", type=int, default=None, help="passes over the real train split")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (global batches)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (all workers together)")
    p.add_argument("--class-balanced", action=argparse.BooleanOptionalAction, default=None,
                   help="draw every class equally often in an epoch")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="K", help="checkpoint every K steps")
    p.add_argument("--log-every", type=int, default=None, metavar="K", help="log a metrics line every K steps")
    p.add_argument("--seed", type=int, default=None, help="seeds weights, noise and data order")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (else CXRF_S3_ENDPOINT / AWS)")
    p.add_argument("--max-failures", type=int, default=2, help="worker failures to recover from (default 2)")
    p.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints to keep (default 3)")
    p.add_argument("--samples-per-class", type=int, default=4, help="samples per class in each grid (default 4)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="Ray CPUs per worker (default: auto)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per worker (default: Ray's)")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny model for 2 steps on top of the preset (checks the setup)")
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    """Preset or file, then --smoke, then the flags, then --set; step flags become images."""
    for flag in ("num_workers", "epochs", "max_steps", "batch_size", "checkpoint_every", "log_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    flags = {"model.arch": args.model, "train.num_workers": args.num_workers, "train.use_gpu": args.use_gpu,
             "train.epochs": args.epochs, "train.max_steps": args.max_steps,
             "train.batch_size": args.batch_size, "train.class_balanced": args.class_balanced,
             "train.seed": args.seed}
    overlays = [preset_data(KIND, SMOKE_OVERLAY)] if args.smoke else []
    config = config_from_args(parser, args, Config, kind=KIND, default=DEFAULT_PRESET,
                              overlays=overlays, flags=flags)
    # The step flags count global batches: they become images at the resolved batch size.
    steps = {"train.checkpoint_every_images": args.checkpoint_every, "train.log_every_images": args.log_every}
    steps = {k: v * config.train.batch_size for k, v in steps.items() if v is not None}
    if not steps:
        return config
    # Flags, then --set: a --set of the same field still has the last word.
    try:
        return config.with_overrides({**steps, **parse_overrides(args.set)})
    except ConfigError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fault = os.environ.get(FAULT_ENV)
    if fault is not None and not fault.isdigit():
        parser.error(f"{FAULT_ENV} must be a step number, got {fault!r}")
    config = resolve_config(args, parser)
    options = RunOptions(
        data=args.data, run_name=args.run_name, storage=args.storage, s3_endpoint=args.s3_endpoint,
        max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints,
        samples_per_class=args.samples_per_class, cpus_per_worker=args.cpus_per_worker,
        torch_threads=args.torch_threads, fault_at_step=int(fault) if fault else None,
    )
    print("[train] resolved config:\n" + yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
    plan = prepare_run(config, options)  # data, storage and checkpoint checks, before Ray starts
    try:
        result = train(config, options, plan=plan)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    in_sync = "yes" if len(set(result.param_digests)) == 1 else f"NO ({result.param_digests})"
    resumed = f" (this attempt resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
    print(f"[train] done: step {result.step}, epoch {result.epoch}, {result.images_seen} real images{resumed}; "
          f"replicas in sync: {in_sync}")
    print(f"[train] generator artifact: {result.artifact_uri}")
    print(f"[train] last checkpoint: {result.checkpoint_uri}")
    return 0


if __name__ == "__main__":
    run_job(main)

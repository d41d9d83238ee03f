"""Starting or joining Ray, and turning user mistakes into clear exits, for the jobs.

Jobs run two ways: ``python jobs/x.py`` on a laptop starts an embedded local Ray, and
``ray job submit -- python jobs/x.py`` joins the cluster (``RAY_ADDRESS`` is set by the Jobs
API). ``ray.init()`` without arguments does exactly that; resource overrides only apply when
we start Ray ourselves.
"""

from __future__ import annotations

import argparse

import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence

from cxrfactory.labels import UnknownClassError
from cxrfactory.shards import ManifestError, OutputConflictError
from cxrfactory.storage import StorageError

#: Errors that mean "the user gave something wrong": reported in one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UnknownClassError, ManifestError, OutputConflictError, StorageError, FileNotFoundError,
    ValueError,
)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` or start a local Ray; a no-op when already up."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"logging_level": logging.WARNING, "configure_logging": True}
    if not os.environ.get("RAY_ADDRESS"):
        # A local Ray keeps Ray's default and starts its dashboard (on 8265, or the next free
        # port): the State API lives there, and Ray Train's placement-group cleaner queries it
        # every second, warning on each failure, for as long as a training run lasts.
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    # Ray Data's per-operator progress bars are the progress a user watches.
    ray.data.DataContext.get_current().enable_progress_bars = True


def quiet_train_reports() -> None:
    """In a Ray Train worker: drop Ray's INFO line for every ``ray.train.report`` call.

    Ray Train 2.60 logs each report (its whole metrics dict) through a logger named after its
    source file (``logging.getLogger(__file__)`` in ``ray/train/v2/_internal/execution/
    context.py``), so ``RunConfig(logging_config=LoggingConfig(log_level="WARNING"))``, which
    filters ``ray.train.*`` names, does not reach it. Our workers print their own progress.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quieten
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def run_job(main: Callable[[Sequence[str] | None], int | None],
            argv: Sequence[str] | None = None) -> None:
    """Run a job's ``main`` and exit: 0 on success, 2 with ``error: ...`` for bad input."""
    try:
        code = main(argv)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to complete what is missing",
              file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command a job was run with, for the outputs' records (``python jobs/x.py ...``).

    ``argv`` is what the job's ``main`` received; None means the process's own arguments.
    """
    args = list(argv) if argv is not None else sys.argv[1:]
    return shlex.join(["python", f"jobs/{os.path.basename(script)}", *args])


#: A synthetic set's name on the command line (``--synthetic NAME=URI``): a plain word.
SET_NAME = re.compile(r"^[A-Za-z0-9][\w.+-]*$")


def parse_named_uris(items: Sequence[str], flag: str = "--synthetic",
                     reserved: Sequence[str] = ("real",)) -> tuple[tuple[str, str], ...]:
    """``["proposed=s3://b/x", ...]`` -> ``(("proposed", "s3://b/x"), ...)``; ValueError on a
    malformed item, a reserved name or a name given twice."""
    pairs = []
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or not uri or not SET_NAME.match(name) or name in reserved:
            others = f" other than {', '.join(map(repr, reserved))}" if reserved else ""
            raise ValueError(f"{flag} {item!r}: expected NAME=URI with a plain NAME{others} "
                             f"(letters, digits, . _ + -), e.g. {flag} proposed=synth/ms")
        pairs.append((name, uri))
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"{flag} names must be unique, got {names}")
    return tuple(pairs)


def named_uris_or_exit(parser: argparse.ArgumentParser, items: Sequence[str],
                       flag: str = "--synthetic") -> tuple[tuple[str, str], ...]:
    """:func:`parse_named_uris` for a job's parser: a malformed item is ``parser.error``
    (usage, the message, exit status 2) like any other bad flag."""
    try:
        return parse_named_uris(items, flag)
    except ValueError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits

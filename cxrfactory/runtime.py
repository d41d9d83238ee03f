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
import shlex
import sys
from collections.abc import Callable, Sequence

from cxrfactory.errors import UserError, find_user_error
from cxrfactory.named_sets import SetNameError, parse_named_uris


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` or start a local Ray; a no-op when already up."""
    import ray

    # A Ray Data stage's own exception then reaches the driver as its ``RayTaskError.cause``:
    # Ray's default wrapper (UserCodeException, "UDF failed to process a data block") crosses
    # the process boundary without its ``__cause__``, and run_job could not find a user error.
    ray.data.DataContext.get_current().raise_original_map_exception = True
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
    """Run a job's ``main`` and exit: 0 on success, 2 with one ``error: ...`` line for a
    :class:`~cxrfactory.errors.UserError` (also one raised in a Ray worker and wrapped by Ray),
    130 on Ctrl-C; anything else is a bug or an outage and keeps its traceback (status 1)."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to complete what is missing",
              file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None:
            raise  # Python prints the traceback and exits with status 1
        print(f"error: {one_line(user_error)}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


def one_line(error: UserError) -> str:
    """A user error's message on one line (a message from a worker may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command a job was run with, for the outputs' records (``python jobs/x.py ...``).

    ``argv`` is what the job's ``main`` received; None means the process's own arguments.
    """
    args = list(argv) if argv is not None else sys.argv[1:]
    return shlex.join(["python", f"jobs/{os.path.basename(script)}", *args])


def named_uris_or_exit(parser: argparse.ArgumentParser, items: Sequence[str],
                       flag: str = "--synthetic") -> tuple[tuple[str, str], ...]:
    """:func:`~cxrfactory.named_sets.parse_named_uris` for a job's parser: a malformed item is
    ``parser.error`` (usage, the message, exit status 2) like any other bad flag."""
    try:
        return parse_named_uris(items, flag)
    except SetNameError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits

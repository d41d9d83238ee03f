"""The project's one error policy.

:class:`UserError` is the base of every error a user can fix by changing what they typed or
what they point at (a flag, a config, a shard folder, free disk space). Jobs print those in one
line (``error: ...``) and exit with status 2, the usage-error status of argparse; every other
exception is a bug or an outage and keeps its traceback (exit status 1). A user error raised in
a Ray worker reaches the user the same way (:func:`cxrfactory.runtime.run_job` finds it inside
Ray's wrappers).

Each subclass also derives from the builtin it refines (``ValueError``, ``RuntimeError``), so
code that catches the builtin keeps working; the policy itself never looks at the builtin.
"""


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and how to fix it."""


def find_user_error(error: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``error``, looking through the wrappers an error raised in
    a Ray worker arrives in; None when there is none (a bug or an outage).

    Followed, breadth first: ``__cause__`` (Ray Data's ``UserCodeException("UDF failed to
    process a data block")`` is raised ``from`` the task's error), ``__context__`` of Ray's own
    exceptions, ``RayTaskError.cause``, Ray Train's ``worker_failures`` (rank -> exception) and
    ``controller_failure``, and an exception group's members. Duck-typed: no Ray import.
    """
    seen: set[int] = set()
    queue = [error]
    while queue:
        current = queue.pop(0)
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        wrapper = isinstance(cause, BaseException)  # RayTaskError: the worker's error is .cause
        if isinstance(current, UserError) and not wrapper:
            return current
        queue.append(cause if wrapper else None)
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            queue.extend(failure for _, failure in sorted(failures.items()))
        queue.append(getattr(current, "controller_failure", None))
        queue.extend(getattr(current, "exceptions", None) or ())
        queue.append(current.__cause__)
        # An implicit context is followed through Ray's own wrappers only: a bug raised while
        # handling a user error (``except StorageError: <bug>``) must keep its traceback.
        if type(current).__module__.split(".")[0] == "ray":
            queue.append(current.__context__)
    return None

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

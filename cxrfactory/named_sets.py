"""Named shard sets: ``--synthetic NAME=URI`` on the command line, ``(name, uri)`` in configs.

Jobs parse the flags with :func:`parse_named_uris`; the library configs that take such pairs
(FDD, the report) check them with :func:`check_named_uris`, so a set name means the same thing
everywhere: a plain word (it names a table row, a column and files), not ``real``, not twice.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from cxrfactory.errors import UserError

__all__ = ["RESERVED_NAMES", "SET_NAME", "SetNameError", "check_named_uris", "parse_named_uris"]

#: A set's name: a plain word.
SET_NAME = re.compile(r"^[A-Za-z0-9][\w.+-]*$")
#: Names the real data already uses in tables and figures.
RESERVED_NAMES = ("real",)


class SetNameError(UserError, ValueError):
    """A ``NAME=URI`` item that is malformed, uses a reserved name or repeats a name."""


def parse_named_uris(items: Sequence[str], flag: str = "--synthetic",
                     reserved: Sequence[str] = RESERVED_NAMES) -> tuple[tuple[str, str], ...]:
    """``["proposed=s3://b/x", ...]`` -> ``(("proposed", "s3://b/x"), ...)``; a
    :class:`SetNameError` on a malformed item, a reserved name or a name given twice."""
    pairs = []
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep:
            raise SetNameError(_malformed(flag, repr(item), reserved))
        pairs.append((name, uri))
    return check_named_uris(pairs, flag=flag, reserved=reserved)


def check_named_uris(pairs: Iterable[tuple[str, str]], *, flag: str = "--synthetic",
                     reserved: Sequence[str] = RESERVED_NAMES,
                     error: type[Exception] = SetNameError) -> tuple[tuple[str, str], ...]:
    """``pairs`` as a tuple of ``(name, uri)`` strings, checked: every name plain and not
    reserved, every URI given, no name twice; else ``error`` (a config passes its own)."""
    checked = tuple((str(name), str(uri)) for name, uri in pairs)
    for name, uri in checked:
        if not uri or not SET_NAME.match(name) or name in reserved:
            raise error(_malformed(flag, repr(f"{name}={uri}"), reserved))
    names = [name for name, _ in checked]
    if len(set(names)) != len(names):
        raise error(f"{flag} names must be unique, got {names}")
    return checked


def _malformed(flag: str, item: str, reserved: Sequence[str]) -> str:
    others = f" other than {', '.join(map(repr, reserved))}" if reserved else ""
    return (f"{flag} {item}: expected NAME=URI with a plain NAME{others} "
            f"(letters, digits, . _ + -), e.g. {flag} proposed=synth/ms")

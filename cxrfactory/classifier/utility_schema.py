"""The contract of ``utility.json``: the downstream-utility experiment's result, as the report reads it.

The experiment trains the same multilabel classifier twice, on the real train split alone
("real") and on real plus synthetic images ("real+synthetic"), and scores both on the same
real test split. The file::

    {
      "classes": ["Normal", "Atelectasis", ...],          # vocabulary order, the table's rows
      "arms": {
        "real":           {"auroc": {class: v}, "macro_auroc": v, "n_train": {class: n}},
        "real+synthetic": {"auroc": {class: v}, "macro_auroc": v, "n_train": {class: n}}
      },
      "delta": {class: v},          # auroc[real+synthetic] - auroc[real], per class
      "macro_delta": v,             # macro_auroc[real+synthetic] - macro_auroc[real]
      "rare_classes": [class, ...], # the classes the experiment calls rare (fewest real images)
      "config": {...}               # how it was run (free-form: seeds, epochs, target, ...)
    }

An AUROC (and so a delta) is ``null`` where it is undefined, e.g. a class without positives in
the test split; ``NaN`` (which Python's ``json`` writes for ``float("nan")``) is read as null.
``n_train`` counts the training images whose label is the class (the synthetic rows included
in the second arm); a class it leaves out is shown as a dash. Further arms may be present; the
report shows these two.

:data:`UTILITY_SCHEMA` is the same contract as a JSON Schema, for the producer's own tests
(``jsonschema.validate(data, UTILITY_SCHEMA)``); :func:`validate_utility` is what the report
runs, without third-party packages, and also checks what a schema cannot: every class is
covered and the deltas agree with the AUROCs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cxrfactory.errors import UserError

#: The two arms the report compares, in table order.
ARMS = ("real", "real+synthetic")

#: Deltas may differ from the AUROC difference by rounding only.
DELTA_TOLERANCE = 1e-6

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_ARM = {
    "type": "object",
    "required": ["auroc", "macro_auroc", "n_train"],
    "properties": {
        "auroc": {"type": "object", "additionalProperties": _NUMBER_OR_NULL},
        "macro_auroc": _NUMBER_OR_NULL,
        "n_train": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
    },
}

#: JSON Schema (draft 2020-12) of ``utility.json``.
UTILITY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "cxrfactory downstream utility result",
    "type": "object",
    "required": ["classes", "arms", "delta", "macro_delta", "rare_classes"],
    "properties": {
        "classes": {"type": "array", "items": {"type": "string"}, "minItems": 1, "uniqueItems": True},
        "arms": {"type": "object", "required": list(ARMS),
                 "properties": {arm: _ARM for arm in ARMS}, "additionalProperties": _ARM},
        "delta": {"type": "object", "additionalProperties": _NUMBER_OR_NULL},
        "macro_delta": _NUMBER_OR_NULL,
        "rare_classes": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "config": {"type": "object"},
    },
}


class UtilityFormatError(UserError, ValueError):
    """A utility.json that does not follow the contract, with every problem found."""


def _number(value: Any) -> float | None:
    """A JSON number or null -> float or None (NaN -> None); anything else raises TypeError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(value)
    return None if math.isnan(value) else float(value)


class _Checks:
    """Collects every problem of one document (the error names them all, not only the first)."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = classes
        self.problems: list[str] = []

    def per_class(self, mapping: Any, where: str, kind: str) -> dict[str, Any]:
        """``{class: number or null}`` (kind "number") or ``{class: count}`` (kind "count")."""
        if not isinstance(mapping, Mapping):
            self.problems.append(f"{where} must be an object keyed by class")
            return {}
        missing = [c for c in self.classes if c not in mapping]
        if missing and kind != "count":  # counts are shown, not compared: a gap is a dash
            self.problems.append(f"{where} lacks {', '.join(missing)}")
        out = {}
        for c in (c for c in self.classes if c in mapping):
            value = mapping[c]
            if kind == "count":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    self.problems.append(f"{where}[{c}] must be a count, got {value!r}")
                out[c] = value
                continue
            try:
                out[c] = _number(value)
            except TypeError:
                self.problems.append(f"{where}[{c}] must be a number or null, got {value!r}")
        return out

    def scalar(self, value: Any, where: str) -> float | None:
        try:
            return _number(value)
        except TypeError:
            self.problems.append(f"{where} must be a number or null, got {value!r}")
            return None

    def arms(self, arms_in: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(arms_in, Mapping) or any(a not in arms_in for a in ARMS):
            self.problems.append(f"'arms' must hold {' and '.join(map(repr, ARMS))}")
            return {}
        arms = {}
        for arm in ARMS:
            body = arms_in[arm] if isinstance(arms_in[arm], Mapping) else {}
            arms[arm] = {"auroc": self.per_class(body.get("auroc"), f"arms[{arm}].auroc", "number"),
                         "macro_auroc": self.scalar(body.get("macro_auroc"), f"arms[{arm}].macro_auroc"),
                         "n_train": self.per_class(body.get("n_train"), f"arms[{arm}].n_train", "count")}
        return arms

    def deltas(self, arms: dict[str, dict[str, Any]], delta: dict[str, Any],
               macro_delta: float | None) -> None:
        """What a schema cannot say: the deltas are the differences of the AUROCs beside them."""
        for c in self.classes:
            a, b = arms["real"]["auroc"][c], arms["real+synthetic"]["auroc"][c]
            expected = None if a is None or b is None else b - a
            if (expected is None) != (delta[c] is None) or (
                    expected is not None and abs(expected - delta[c]) > DELTA_TOLERANCE):
                self.problems.append(f"delta[{c}] = {delta[c]!r} but the AUROCs give {expected!r}")
        a, b = arms["real"]["macro_auroc"], arms["real+synthetic"]["macro_auroc"]
        if None not in (a, b, macro_delta) and abs((b - a) - macro_delta) > DELTA_TOLERANCE:
            self.problems.append(f"macro_delta = {macro_delta!r} but the macro AUROCs give {b - a!r}")


def validate_utility(data: Any, source: str = "utility.json") -> dict[str, Any]:
    """Check ``data`` against the contract; return it with NaN replaced by None.

    Raises :class:`UtilityFormatError` naming every problem (not only the first).
    """
    if not isinstance(data, Mapping):
        raise UtilityFormatError(f"{source}: expected a JSON object, got {type(data).__name__}")
    classes = data.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)
            and len(set(classes)) == len(classes)):
        raise UtilityFormatError(f"{source}: 'classes' must be a non-empty list of distinct names")
    check = _Checks(classes)
    arms = check.arms(data.get("arms"))
    delta = check.per_class(data.get("delta"), "delta", "number")
    macro_delta = check.scalar(data.get("macro_delta"), "macro_delta")
    rare = data.get("rare_classes")
    if not isinstance(rare, list) or any(c not in classes for c in rare):
        check.problems.append(f"'rare_classes' must list classes of 'classes', got {rare!r}")
    config = data.get("config", {})
    if not isinstance(config, Mapping):
        check.problems.append("'config' must be an object")
    if not check.problems:
        check.deltas(arms, delta, macro_delta)
    if check.problems:
        raise UtilityFormatError(f"{source} does not follow the utility.json contract: "
                                 + "; ".join(check.problems))
    return {"classes": list(classes), "arms": {**dict(data["arms"]), **arms}, "delta": delta,
            "macro_delta": macro_delta, "rare_classes": list(rare), "config": dict(config)}

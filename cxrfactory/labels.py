"""Class vocabulary, NIH label mapping and multi-hot targets.

The vocabulary's order is the contract: a class's index is its position, the generator's
condition vector uses it, and it travels inside every checkpoint and artifact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from cxrfactory.errors import UserError

#: The default vocabulary (index = position). NIH's ``No Finding`` is ``Normal``.
DEFAULT_CLASSES: tuple[str, ...] = (
    "Normal",
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
)

#: The 8 diseases the paper conditions on.
DISEASES: tuple[str, ...] = DEFAULT_CLASSES[1:]

#: NIH's name for an image without findings.
NIH_NO_FINDING = "No Finding"

#: Every finding NIH ChestX-ray14 uses (14 diseases + No Finding).
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
    "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
    "Pneumonia", "Pneumothorax", NIH_NO_FINDING,
)


class UnknownClassError(UserError, ValueError):
    """A class name outside the vocabulary."""


def parse_findings(finding_labels: str) -> list[str]:
    """NIH's ``Finding Labels`` cell (``"Effusion|Mass"``) -> findings, ``No Finding`` -> ``[]``."""
    names = [name.strip() for name in str(finding_labels).split("|") if name.strip()]
    return [name for name in names if name != NIH_NO_FINDING]


def nih_to_class(finding: str) -> str:
    """Map one NIH finding name to its class name (``No Finding`` -> ``Normal``)."""
    return "Normal" if finding == NIH_NO_FINDING else finding


def validate_classes(
    classes: Iterable[str] | None, vocabulary: Sequence[str] = DEFAULT_CLASSES
) -> tuple[str, ...]:
    """Return ``classes`` in vocabulary order, or the whole vocabulary when None.

    Raises :class:`UnknownClassError` listing the vocabulary for a name outside it, and for an
    empty or repeated selection.
    """
    if classes is None:
        return tuple(vocabulary)
    chosen = [str(name) for name in classes]
    unknown = [name for name in chosen if name not in vocabulary]
    if unknown:
        raise UnknownClassError(
            f"unknown class(es) {', '.join(map(repr, unknown))}; "
            f"choose from: {', '.join(vocabulary)}"
        )
    if not chosen:
        raise UnknownClassError(f"no class selected; choose from: {', '.join(vocabulary)}")
    if len(set(chosen)) != len(chosen):
        raise UnknownClassError(f"a class is named twice in {chosen}")
    return tuple(name for name in vocabulary if name in chosen)


def class_index(name: str, classes: Sequence[str] = DEFAULT_CLASSES) -> int:
    """Position of ``name`` in ``classes``; a clear error when absent."""
    try:
        return list(classes).index(name)
    except ValueError:
        raise UnknownClassError(
            f"unknown class {name!r}; choose from: {', '.join(classes)}"
        ) from None


def multi_hot(
    findings: Sequence[Sequence[str]], classes: Sequence[str] = DEFAULT_CLASSES
) -> np.ndarray:
    """Per-image finding lists -> float32 multi-hot ``(N, len(classes))``.

    An empty list means Normal when ``Normal`` is in ``classes``; findings outside
    ``classes`` (e.g. Hernia) are ignored, as a multilabel classifier over ``classes`` would.
    """
    position = {name: i for i, name in enumerate(classes)}
    out = np.zeros((len(findings), len(classes)), dtype=np.float32)
    for row, names in enumerate(findings):
        names = [nih_to_class(n) for n in names] or ["Normal"]
        for name in names:
            if name in position:
                out[row, position[name]] = 1.0
    return out

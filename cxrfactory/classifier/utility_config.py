"""The downstream-utility experiment's typed config (jobs/evaluate_utility.py).

One :class:`UtilityConfig`: the classifier both arms share (a whole :class:`ClassifierConfig`
section, its ``synthetic`` roots the set under test), the rows per class the arms are capped
and filled to, and the real split they are scored on. Presets live in
``cxrfactory/configs/utility/``, one per classifier preset of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cxrfactory import config as _config
from cxrfactory.classifier.config import ClassifierConfig

#: The preset kind (folder under cxrfactory/configs/) of utility experiments.
KIND = "utility"


@dataclass(frozen=True)
class UtilityConfig:
    """Real only vs real + synthetic: the shared classifier, the per-class target, the split."""

    classifier: ClassifierConfig  # the classifier setup both arms train (real, out, synthetic, schedule, ...)
    target_per_class: int | None = None  # rows per class per epoch in both arms; None: the largest real class's train count
    split: str = "test"  # real split both arms are scored on (neither arm trains or validates on it)

    def __post_init__(self) -> None:
        if self.target_per_class is not None and self.target_per_class < 1:
            raise _config.ConfigError(f"target_per_class must be >= 1, got {self.target_per_class}")
        if not self.split:
            raise _config.ConfigError("split must name a real split (e.g. test)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return _config.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UtilityConfig:
        """Strict inverse of :meth:`to_dict`: unknown keys and wrong types are ConfigErrors."""
        return _config.from_dict(cls, data)

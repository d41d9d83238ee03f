"""The classifier run's typed config and its network sizes.

A :class:`ClassifierConfig` is saved in every checkpoint and in the artifact; the presets in
``cxrfactory/configs/classifier/`` (``full``, ``demo``, ``smoke``) are starting points that
flags and ``--set field=value`` override field by field (:func:`load_classifier_preset`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cxrfactory import config as _config
from cxrfactory.errors import UserError
from cxrfactory.labels import validate_classes
from cxrfactory.models.densenet import Preprocessing, XrayDenseNet, densenet121_xray

#: The preset kind (folder under cxrfactory/configs/) of classifier runs.
KIND = "classifier"
#: Network sizes ``ClassifierConfig.arch`` names: DenseNet-121 itself, and smaller siblings
#: for CPU demos and tests.
NETWORK_SIZES: dict[str, dict[str, Any]] = {
    "densenet121": {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64},
    "small": {"growth_rate": 16, "block_config": (3, 6, 9, 6), "num_init_features": 32},
    "tiny": {"growth_rate": 8, "block_config": (2, 2, 2, 2), "num_init_features": 16},
}
MODES = ("multiclass", "multilabel")
#: The validation metric that picks the checkpoint Ray Train keeps.
SCORE_METRIC = "val_macro_auroc"


class ClassifierError(UserError, ValueError):
    """Input that cannot train a classifier (missing split, empty class, bad mix, ...)."""


class ClassifierTrainingError(RuntimeError):
    """Training itself failed (a worker error that recovery could not get past)."""


@dataclass(frozen=True)
class ClassifierConfig:
    """One classifier training run; saved in every checkpoint and in the artifact."""

    real: str  # real shard root (path or s3://): its train split trains, its val split picks the checkpoint
    out: str  # folder or s3:// URI: classifier/ (the artifact), metrics.jsonl, runs/ (Ray Train's storage)
    classes: tuple[str, ...] | None = None  # classes to learn, vocabulary order; None: the real manifest's
    mode: str = "multiclass"  # multiclass: softmax CE on `label`; multilabel: per-class sigmoid BCE on `findings`
    arch: str = "densenet121"  # a key of NETWORK_SIZES
    resolution: int = 256  # preprocessing side in px: the paper's image size, so 256-px shards are not resampled
    weights: str | None = None  # state dict file (path or s3:// URI) to start from (ours, or torchvision's ImageNet file); None: random init
    synthetic: tuple[str, ...] = ()  # synthetic shard roots mixed into training
    synthetic_ratio: float | None = None  # synthetic fraction of each epoch's rows, in [0, 1); None: see balance_per_class
    balance_per_class: int | None = None  # at most this many rows per class per epoch, real first, synthetic fill the gap (without synthetic: a cap on real rows)
    class_weighted: bool = False  # inverse-frequency weights: CE class weights, BCE pos_weight
    augment: bool = True  # light random affine + brightness/contrast on training batches (never validation)
    epochs: int = 10  # passes over the training mix
    batch_size: int = 32  # global batch (all workers together)
    lr: float = 1e-3  # AdamW learning rate, cosine-annealed to 0 over the epochs
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    max_steps_per_epoch: int | None = None  # cut every epoch after this many steps (smoke runs); None: full passes
    num_workers: int = 1  # Ray Train workers (DDP replicas)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float | None = None  # Ray CPUs per worker; None: 1, or less so Ray Data keeps a CPU
    torch_threads: int | None = None  # torch intra-op threads per worker; None: Ray's default (its CPUs)
    seed: int = 0  # weights, augmentation and every epoch's draw and shuffle
    storage: str | None = None  # Ray Train storage (path or s3://); None: <out>/runs
    run_name: str = "classifier"  # the run's folder in storage; the same name resumes it
    max_failures: int = 2  # worker failures recovered from the last checkpoint
    s3_endpoint: str | None = None  # S3-compatible endpoint for s3:// locations

    def __post_init__(self) -> None:
        object.__setattr__(self, "synthetic", tuple(self.synthetic))
        if self.classes is not None:
            object.__setattr__(self, "classes", validate_classes(self.classes))
        if self.mode not in MODES:
            raise ClassifierError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.arch not in NETWORK_SIZES:
            raise ClassifierError(f"arch must be one of {tuple(NETWORK_SIZES)}, got {self.arch!r}")
        for name in ("epochs", "batch_size", "num_workers", "resolution"):
            if getattr(self, name) < 1:
                raise ClassifierError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.resolution < 32:
            raise ClassifierError(f"resolution must be >= 32 px (DenseNet downsamples 32x), got {self.resolution}")
        if self.batch_size % self.num_workers:
            raise ClassifierError(f"batch_size {self.batch_size} must be divisible by num_workers {self.num_workers}")
        if self.synthetic_ratio is not None and not 0 <= self.synthetic_ratio < 1:
            raise ClassifierError(f"synthetic_ratio must be in [0, 1), got {self.synthetic_ratio}")
        if self.synthetic_ratio is not None and self.balance_per_class is not None:
            raise ClassifierError("give synthetic_ratio or balance_per_class, not both")
        if self.synthetic_ratio is not None and not self.synthetic:
            raise ClassifierError("synthetic_ratio needs synthetic shard roots")
        if self.balance_per_class is not None and self.balance_per_class < 1:
            raise ClassifierError(f"balance_per_class must be >= 1, got {self.balance_per_class}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ClassifierError("max_steps_per_epoch must be >= 1 or None")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_failures < 0:
            raise ClassifierError("lr must be > 0, weight_decay and max_failures >= 0")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ClassifierError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(resolution=self.resolution)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists): what checkpoints and the artifact hold."""
        return _config.to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassifierConfig:
        """Strict inverse of :meth:`to_dict`: unknown keys and wrong types are ConfigErrors."""
        return _config.from_dict(cls, data)


def load_classifier_preset(name: str, **required: Any) -> ClassifierConfig:
    """A preset of ``cxrfactory/configs/classifier/``; ``required``: ``real=..., out=...``."""
    return _config.load_preset(ClassifierConfig, KIND, name, **required)


def build_model(config: ClassifierConfig, num_classes: int) -> XrayDenseNet:
    return densenet121_xray(num_classes=num_classes, weights_path=config.weights,
                            s3_endpoint=config.s3_endpoint, **NETWORK_SIZES[config.arch])

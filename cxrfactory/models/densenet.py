"""DenseNet-121 for one-channel chest X-rays: classifier and FDD feature extractor, with its preprocessing.

The architecture is torchvision's ``DenseNet`` with the first convolution reading one channel.
Nothing is ever downloaded: the network starts random or from a local weights file, either our
own state dict or a torchvision-format one (e.g. ImageNet ``densenet121-*.pth``), whose RGB
first convolution is folded to grayscale by summing over its input channels.

Preprocessing travels with the weights, as torchvision's ``Weights.transforms()``: a
:class:`Preprocessing` is saved in the classifier artifact's ``config.json`` and FDD applies
exactly the one the features were trained with.

The trained network, its classes and preprocessing travel together as the classifier artifact
(:mod:`cxrfactory.classifier.artifact`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.densenet import DenseNet

from cxrfactory.images import decode_png
from cxrfactory.storage import resolve
from cxrfactory.weights import WeightsError, load_weights


__all__ = [
    "DenseNetConfig",
    "Preprocessing",
    "XrayDenseNet",
    "decode_images",
    "densenet121_xray",
    "load_weights_file",
    "load_state",
    "preprocess",
]



# -- preprocessing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How images become network input; saved next to the weights it was trained with."""

    resolution: int = 224  # the whole image is resized to resolution × resolution (no crop)
    mean: float = 0.449  # subtracted after scaling to [0, 1]; ImageNet's RGB means, averaged
    std: float = 0.226  # divisor after the mean; ImageNet's RGB stds, averaged
    grayscale: bool = True  # one input channel; RGB input is reduced with PIL's "L" weights

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution < 8:
            raise ValueError(
                f"preprocessing resolution must be an int >= 8, got {self.resolution!r}"
            )
        if not self.std > 0:
            raise ValueError(f"preprocessing std must be positive, got {self.std!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-native dict (what ``config.json`` and statistics metadata store)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted(known - set(data))
        if unknown or missing:
            raise ValueError(
                f"preprocessing entry: missing {missing or 'nothing'}, "
                f"unknown {unknown or 'nothing'}"
            )
        numbers_ok = all(
            isinstance(data[k], (int, float)) and not isinstance(data[k], bool)
            for k in ("resolution", "mean", "std")
        )
        if not numbers_ok or not isinstance(data["grayscale"], bool):
            raise ValueError(f"preprocessing entry has values of the wrong type: {data}")
        return cls(
            resolution=int(data["resolution"]),
            mean=float(data["mean"]),
            std=float(data["std"]),
            grayscale=data["grayscale"],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        return cls.from_dict(json.loads(text))

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        return preprocess(images, self)


# ITU-R 601 luma, as PIL's convert("L"): the grayscale a PNG round trip would give.
_LUMA = (0.299, 0.587, 0.114)


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W), (B, C, H, W) or (B, H, W, C) with C in {1, 3} -> (B, C, H, W)."""
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x.permute(0, 3, 1, 2)
    raise ValueError(
        f"images must be (B, H, W), (B, C, H, W) or (B, H, W, C) with 1 or 3 channels, "
        f"got shape {tuple(x.shape)}"
    )


def preprocess(images: torch.Tensor | np.ndarray, preprocessing: Preprocessing) -> torch.Tensor:
    """A batch of images -> normalised float32 (B, C, R, R) network input, C = 1 if grayscale.

    uint8 input is scaled by 1/255; float input must already lie in [0, 1] (a [0, 255] or
    [-1, 1] float batch is refused rather than silently mis-normalised). The result stays on
    the input's device.
    """
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # Ray hands out read-only views; torch warns on sharing them
    x = _channels_first(torch.as_tensor(images))
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    elif x.is_floating_point():
        x = x.to(torch.float32)
        if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
            raise ValueError(
                f"float images must lie in [0, 1], got [{x.min().item():.3g}, {x.max().item():.3g}]"
            )
    else:
        raise ValueError(f"images must be uint8 or floating point, got {x.dtype}")
    if preprocessing.grayscale and x.shape[1] == 3:
        luma = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * luma).sum(dim=1, keepdim=True)
    elif not preprocessing.grayscale and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    size = preprocessing.resolution
    if x.shape[-2:] != (size, size):
        # Antialiasing matters when a 1024-px NIH image goes down to 224 px: without it the
        # result aliases the rib edges and the noise, and features depend on the source size.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
    return ((x - preprocessing.mean) / preprocessing.std).contiguous()


def decode_images(png_column: Sequence[Any], preprocessing: Preprocessing) -> torch.Tensor:
    """The ``image`` column (``{"bytes", "path"}`` structs or raw bytes) -> float32 (N, 1, R, R).

    Images of one size are preprocessed as one batch; mixed sizes (real 256 px next to a 64-px
    synthetic set) one by one, since each is resized to the same side anyway.
    """
    pixels = [decode_png(item["bytes"] if isinstance(item, dict) else item)
              for item in png_column]
    if not pixels:
        side = preprocessing.resolution
        return torch.zeros((0, 1, side, side))
    if len({p.shape for p in pixels}) == 1:
        return preprocess(np.stack(pixels), preprocessing)
    return torch.cat([preprocess(p[None], preprocessing) for p in pixels])


# -- the network ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseNetConfig:
    """Architecture of an :class:`XrayDenseNet`; the defaults are DenseNet-121."""

    num_classes: int  # outputs of the linear head (one logit per class)
    growth_rate: int = 32  # channels each dense layer adds (k in the paper)
    block_config: tuple[int, ...] = (6, 12, 24, 16)  # dense layers per block
    num_init_features: int = 64  # channels of the first convolution
    bn_size: int = 4  # bottleneck width, in multiples of growth_rate
    drop_rate: float = 0.0  # dropout after each dense layer (training only)
    memory_efficient: bool = False  # gradient checkpointing: less memory, slower training

    def __post_init__(self) -> None:
        # JSON gives lists back; the config must compare equal after a round trip.
        object.__setattr__(self, "block_config", tuple(int(n) for n in self.block_config))
        if self.num_classes < 1 or self.growth_rate < 1 or self.num_init_features < 1:
            raise ValueError(f"invalid DenseNet config: {self}")
        if not self.block_config or min(self.block_config) < 1:
            raise ValueError(f"block_config needs at least one block of >= 1 layer: {self}")

    @property
    def feature_dim(self) -> int:
        """Channels after the last block: torchvision's bookkeeping (half at each transition)."""
        channels = self.num_init_features
        for i, layers in enumerate(self.block_config):
            channels += layers * self.growth_rate
            if i != len(self.block_config) - 1:
                channels //= 2
        return channels


class XrayDenseNet(nn.Module):
    """DenseNet for (B, 1, H, W) input: ``forward`` gives logits, ``features`` the embedding.

    ``trunk`` is torchvision's ``DenseNet.features`` (conv0 ... norm5) with a one-channel
    conv0; ``classifier`` its linear head. Keeping torchvision's module names below ``trunk``
    lets torchvision-format state dicts load with a prefix rename.
    """

    def __init__(self, config: DenseNetConfig) -> None:
        super().__init__()
        self.config = config
        net = DenseNet(
            growth_rate=config.growth_rate,
            block_config=config.block_config,  # type: ignore[arg-type]
            num_init_features=config.num_init_features,
            bn_size=config.bn_size,
            drop_rate=config.drop_rate,
            num_classes=config.num_classes,
            memory_efficient=config.memory_efficient,
        )
        conv0 = nn.Conv2d(1, config.num_init_features, kernel_size=7, stride=2, padding=3,
                          bias=False)
        nn.init.kaiming_normal_(conv0.weight)  # torchvision's init for every conv
        net.features.conv0 = conv0
        self.trunk: nn.Sequential = net.features
        self.classifier: nn.Linear = net.classifier

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) normalised images -> (B, feature_dim) pooled embedding.

        Taken AFTER the final ReLU, then global-average-pooled: exactly the vector the linear
        head reads in torchvision's ``forward`` (norm5 has no activation of its own), and the
        convention of pytorch-fid's Inception pool3 features (post-activation, pooled).
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected (B, 1, H, W) input, got shape {tuple(x.shape)}")
        out = F.relu(self.trunk(x), inplace=True)  # (B, C, H/32, W/32)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, num_classes) logits (multi-label: apply a sigmoid per class)."""
        return self.classifier(self.features(x))


# torchvision's legacy DenseNet checkpoints name sub-modules "norm.1"; today's are "norm1".
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _from_torchvision_format(state: dict[str, torch.Tensor], model: XrayDenseNet,
                             source: str) -> dict[str, torch.Tensor]:
    """Map a torchvision ``DenseNet`` state dict onto :class:`XrayDenseNet` keys.

    conv0's RGB kernels are summed over the input channels: for a gray image replicated to
    RGB the folded kernel gives the same response. A classifier of another size (ImageNet's
    1000 classes) is left at its fresh initialisation.
    """
    mapped: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        legacy = _LEGACY_KEY.match(key)
        key = legacy.group(1) + legacy.group(2) if legacy else key
        if key.startswith("features."):
            mapped["trunk." + key[len("features."):]] = value
        elif key.startswith("classifier."):
            mapped[key] = value
        else:
            raise WeightsError(f"{source}: unexpected key {key!r} for a DenseNet state dict")
    conv0 = mapped.get("trunk.conv0.weight")
    if conv0 is not None and conv0.ndim == 4 and conv0.shape[1] == 3:
        mapped["trunk.conv0.weight"] = conv0.sum(dim=1, keepdim=True)
    own = model.state_dict()
    for key in ("classifier.weight", "classifier.bias"):
        if key in mapped and mapped[key].shape != own[key].shape:
            mapped[key] = own[key]
    return mapped


#: Where a weights file a user points at comes from.
WEIGHTS_MADE_BY = ("jobs/train_classifier.py (its classifier.pt) or torchvision's DenseNet-121 "
                   "weights saved as a state dict")


def load_weights_file(model: XrayDenseNet, path: str | os.PathLike[str],
                      s3_endpoint: str | None = None) -> None:
    """Load a state dict file (ours or torchvision-format; a path or an s3:// URI) into
    ``model``; WeightsError when the file is absent, not trusted or does not fit."""
    loc = resolve(str(path), s3_endpoint)
    if not loc.is_file():
        raise WeightsError(f"weights file not found: {loc.uri}")
    state = load_weights(loc.read_bytes(), source=loc.uri, made_by=WEIGHTS_MADE_BY)
    load_state(model, state, loc.uri)


def load_state(model: XrayDenseNet, state: Any, source: str) -> None:
    """Put a loaded state dict (ours or torchvision-format) into ``model``, strictly."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{source}: expected a state dict of tensors")
    if any(key.startswith("features.") for key in state):
        state = _from_torchvision_format(state, model, source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise WeightsError(f"{source}: weights do not fit {model.config}: {error}") from None


def densenet121_xray(
    *,
    num_classes: int,
    weights_path: str | os.PathLike[str] | None = None,
    s3_endpoint: str | None = None,
    memory_efficient: bool = False,
    growth_rate: int = 32,
    block_config: tuple[int, ...] = (6, 12, 24, 16),
    num_init_features: int = 64,
    drop_rate: float = 0.0,
) -> XrayDenseNet:
    """DenseNet-121 (or a smaller sibling, for tests and demos) for one-channel X-rays.

    ``weights_path``: a state dict file (a path or an s3:// URI), ours or torchvision-format; None keeps torchvision's
    random initialisation. Never downloads.
    """
    config = DenseNetConfig(
        num_classes=num_classes,
        growth_rate=growth_rate,
        block_config=tuple(block_config),
        num_init_features=num_init_features,
        drop_rate=drop_rate,
        memory_efficient=memory_efficient,
    )
    model = XrayDenseNet(config)
    if weights_path is not None:
        load_weights_file(model, weights_path, s3_endpoint)
    return model

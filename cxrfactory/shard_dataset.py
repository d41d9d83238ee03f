"""Shard folders for plain PyTorch: a map-style dataset over the rows a manifest lists.

>>> from torch.utils.data import DataLoader
>>> data = ShardDataset("data/real", split="train")
>>> image, target = data[0]                     # float32 (1, H, W) in [0, 1], class index
>>> loader = DataLoader(data, batch_size=32, shuffle=True, num_workers=2)

The Ray Data readers live in :mod:`cxrfactory.raydata`; this module imports neither Ray nor,
until an item is read, torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from cxrfactory.images import decode_png
from cxrfactory.labels import DEFAULT_CLASSES, UnknownClassError, multi_hot
from cxrfactory.shards import read_manifest, read_shard, select_files
from cxrfactory.storage import check_readable, resolve

__all__ = ["ShardDataset"]


class ShardDataset:
    """Map-style PyTorch dataset over a shard folder: ``dataset[i] -> (image, target)``.

    ``image`` is ``transform(uint8 (H, W))``, by default a float32 ``(1, H, W)`` tensor in
    [0, 1]; ``target`` is the class index in ``classes`` (``target="class"``) or a float32
    multi-hot over ``classes`` from the row's findings (``target="multi_hot"``).

    ``classes`` is the target vocabulary, in order (default: the manifest's); rows of other
    classes are left out. Give two folders the same ``classes`` to concatenate them
    (``torch.utils.data.ConcatDataset``), e.g. real ``split="train"`` plus synthetic rows.

    The small columns of every listed shard are read upfront (the image column is not); PNG
    bytes are read one file at a time when first needed and kept for the ``cache_files`` most
    recent files (None: all, i.e. the folder's compressed size in memory, for shuffled
    epochs). Decoding happens per item, in the DataLoader's workers.

    Any object with ``__len__`` and ``__getitem__`` is a map-style dataset to
    ``torch.utils.data.DataLoader``; this class does not subclass ``torch.utils.data.Dataset``
    only so that this module imports without torch.
    """

    TARGETS = ("class", "multi_hot")

    def __init__(self, uri: str, *, split: str | None = None,
                 classes: Sequence[str] | None = None, target: str = "class",
                 transform: Callable[[np.ndarray], Any] | None = None,
                 s3_endpoint: str | None = None, cache_files: int | None = None) -> None:
        if target not in self.TARGETS:
            raise ValueError(f"target must be one of {self.TARGETS}, got {target!r}")
        if cache_files is not None and cache_files < 1:
            raise ValueError(f"cache_files must be >= 1 or None, got {cache_files}")
        self.root = resolve(uri, s3_endpoint)
        check_readable(self.root, "shard folder")
        self.manifest = read_manifest(self.root)
        if split is not None and split not in self.manifest.counts:
            raise ValueError(f"{uri} has no split {split!r}; it holds {', '.join(self.manifest.counts)}")
        self.classes = list(classes) if classes is not None else list(self.manifest.classes)
        known = set(self.manifest.classes) | set(DEFAULT_CLASSES)
        unknown = [c for c in self.classes if c not in known]
        if unknown or len(set(self.classes)) != len(self.classes):
            raise UnknownClassError(f"classes {self.classes} repeat a name or name one neither "
                                    f"{uri} nor the default vocabulary knows ({unknown})")
        self.target, self.transform, self.cache_files = target, transform, cache_files

        position = {c: i for i, c in enumerate(self.classes)}
        self.files = sorted(select_files(self.manifest, position, split))
        file_idx, row_idx, labels, findings, image_ids = [], [], [], [], []
        for k, rel in enumerate(self.files):
            table = read_shard(self.root.join(rel), columns=["image_id", "label", "findings", "split"])
            keep = np.ones(table.num_rows, dtype=bool)
            if split is not None:
                keep &= np.asarray(table.column("split").to_pylist()) == split
            table_labels = table.column("label").to_pylist()
            keep &= np.array([lab in position for lab in table_labels], dtype=bool)
            rows = np.flatnonzero(keep)
            file_idx.append(np.full(len(rows), k, dtype=np.int64))
            row_idx.append(rows)
            all_findings = table.column("findings").to_pylist()
            all_ids = table.column("image_id").to_pylist()
            for r in rows:
                labels.append(position[table_labels[r]])
                findings.append(all_findings[r])
                image_ids.append(all_ids[r])
        self._file = np.concatenate(file_idx) if file_idx else np.zeros(0, dtype=np.int64)
        self._row = np.concatenate(row_idx) if row_idx else np.zeros(0, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)  # (N,) class index per item
        self.findings: list[list[str]] = findings
        self.image_ids: list[str] = image_ids
        self._images: dict[int, pa.Array] = {}  # file index -> its PNG bytes column (LRU order)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        import torch

        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index = int(index) % len(self)
        pixels = decode_png(self._png_bytes(int(self._file[index]), int(self._row[index])))
        if self.transform is not None:
            image = self.transform(pixels)
        else:
            image = torch.from_numpy(pixels.copy()).unsqueeze(0).float().div_(255.0)  # (1, H, W)
        if self.target == "class":
            return image, int(self.labels[index])
        return image, torch.from_numpy(multi_hot([self.findings[index]], self.classes)[0])

    def _png_bytes(self, file_index: int, row: int) -> bytes:
        column = self._images.pop(file_index, None)
        if column is None:
            table = read_shard(self.root.join(self.files[file_index]), columns=["image"])
            column = table.column("image").combine_chunks().field("bytes")
            if self.cache_files is not None:
                while len(self._images) >= self.cache_files:
                    self._images.pop(next(iter(self._images)))  # least recently used
        self._images[file_index] = column  # (re)insert as most recently used
        return column[row].as_py()

"""Dataset registry and the train/val/test split shared by every experiment.

Datasets are small enough (MNIST-sized) to live in memory as normalised tensors, so a
loader decodes once per process and every later `load` only re-slices. The validation
split is drawn from the official train split with its own seed so that it stays fixed
while model seeds vary, as in the lottery-ticket experiments.

Sets that do not fit in memory are not loaded here: `image_folder` (ImageNet layouts) is
registered so that specs can name it, and streamed from disk (pai_core.data.image_folder,
pai_core.data.stream) with the same split rule applied to its file list.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pai_core.paths import data_root

LoaderFn = Callable[[Path], "tuple[Split, Split]"]


class DataUnavailable(RuntimeError):
    """A dataset cannot be obtained on this machine by any known route."""


@dataclass(frozen=True, eq=False)
class Split:
    """One split in memory. `eq=False`: tensor equality has no single truth value."""

    x: torch.Tensor  # float32, N×C×H×W, normalised
    y: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, eq=False)
class DataBundle:
    name: str
    train: Split
    val: Split
    test: Split
    in_shape: tuple[int, int, int]
    num_classes: int


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_shape: tuple[int, int, int]
    num_classes: int
    train_size: int  # official train split, before holding out validation
    default_val_size: int
    # `data.augment` when unset (pai_core.augment kinds): the paper standard for the dataset
    default_augment: tuple[str, ...] = ()
    # per channel, the normalised value of a black pixel: the crop's padding, as the reference
    # pads before Normalize; None = 0 (the mean colour)
    crop_fill: tuple[float, ...] | None = None
    description: str = ""  # what `pai list` prints instead of the shape line, when set


_REGISTRY: dict[str, tuple[DatasetInfo, LoaderFn]] = {}


def register_dataset(info: DatasetInfo) -> Callable[[LoaderFn], LoaderFn]:
    """Register a loader returning the full official (train, test) splits, normalised."""

    def deco(fn: LoaderFn) -> LoaderFn:
        if info.name in _REGISTRY:
            raise ValueError(f"dataset {info.name!r} registered twice")
        _REGISTRY[info.name] = (info, fn)
        return fn

    return deco


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def dataset_info(name: str) -> DatasetInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; data.name must be one of {dataset_names()}")
    return _REGISTRY[name][0]


@functools.lru_cache(maxsize=8)
def _full_splits(name: str, root: Path) -> tuple[Split, Split]:
    """Decoded official splits; cached because decoding MNIST costs seconds, slicing does not."""
    info, fn = _REGISTRY[name]
    train, test = fn(root)
    for split, what in ((train, "train"), (test, "test")):
        if tuple(split.x.shape[1:]) != info.in_shape or split.x.dtype != torch.float32:
            raise RuntimeError(f"{name} {what}: got {tuple(split.x.shape)} {split.x.dtype}")
    return train, test


def clear_cache() -> None:
    """Drop the in-process tensors (tests, or to free memory)."""
    _full_splits.cache_clear()


def _check_val_size(v: object, n: int, name: str = "") -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        where = f" for {name}" if name else ""
        raise ValueError(
            f"data.val_size must be an int in 0..{n - 1} (0 <= val_size < {n}){where}, got {v!r}"
        )


def split_indices(n: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx) into a train split of length n, both ascending.

    A dedicated generator keeps the split independent of the global (model) seed.
    """
    _check_val_size(val_size, n)
    gen = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=gen)
    val_idx = perm[:val_size].sort().values
    train_idx = perm[val_size:].sort().values
    return train_idx, val_idx


def load(
    name: str, *, val_size: int | None = None, split_seed: int = 0, root: Path | None = None
) -> DataBundle:
    """Load `name` with `val_size` examples of the official train split held out as val."""
    info = dataset_info(name)
    resolved = (Path(root) if root is not None else data_root()).expanduser().resolve()
    v = info.default_val_size if val_size is None else val_size
    _check_val_size(v, info.train_size, name)  # before decoding: a bad config fails fast
    full_train, test = _full_splits(name, resolved)
    train_idx, val_idx = split_indices(len(full_train), v, split_seed)
    return DataBundle(
        name=name,
        train=Split(full_train.x[train_idx], full_train.y[train_idx]),
        val=Split(full_train.x[val_idx], full_train.y[val_idx]),
        test=Split(test.x.clone(), test.y.clone()),  # callers may mutate; keep the cache intact
        in_shape=info.in_shape,
        num_classes=info.num_classes,
    )

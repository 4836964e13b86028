"""`image_folder`: ImageNet-style folders streamed from disk, never held in memory.

Layout (ImageNet, and Tiny-ImageNet as unpacked):

    <root>/train/<class>/**/<image>     classes = the sorted folder names of train/
    <root>/val/<class>/**/<image>       the test split (ImageNet after the usual valprep)
    <root>/val/val_annotations.txt      or: Tiny-ImageNet's own val layout (images/ + this file)

A validation split is held out of train by `data.split_seed` / `data.val_size` as for every
dataset, on the file list. Files are read by DataLoader workers (pai_core.data.stream) and
decoded with PIL, with the ImageNet transforms of pai_core.data.image_transforms (seeded per
example, never from a global or worker RNG).

Where the data is: `data.root` (relative paths are under PAI_DATA). The stage keys name the
data by what identifies it, never by where it lies: the folder's own name, a fingerprint of
its file list (relative paths and labels) and the image size. A stage finds the folder on
its machine by that name and fingerprint (`locate`): among the folders validated in this
process, those listed in PAI_IMAGE_FOLDERS (inherited by worker processes), and
PAI_DATA/<name>.
"""
from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pai_core.data.image_transforms import DEFAULT_CROP, Crop, FolderDataset
from pai_core.data.registry import (DataBundle, DatasetInfo, DataUnavailable, Split, register_dataset,
                                    split_indices)
from pai_core.paths import data_root

NAME = "image_folder"
DEFAULT_IMAGE_SIZE = 224  # ImageNet; 64 for Tiny-ImageNet
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
TINY_ANNOTATIONS = "val_annotations.txt"
FOLDERS_ENV = "PAI_IMAGE_FOLDERS"
MAX_DEFAULT_VAL = 10_000
STAMP_SECONDS = 2.0  # a listing is trusted this long before its folders' mtimes are checked again

# Registered so that `data.dataset: image_folder` validates and `pai list` names it; the
# numbers are ImageNet-1k's, as a reminder: every real value comes from the folder.
PLACEHOLDER = DatasetInfo(NAME, (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE), 1000, train_size=1_281_167,
                          default_val_size=MAX_DEFAULT_VAL,
                          description="ImageNet-style root/train/<class>/*, root/val/<class>/* streamed from disk "
                                      "(data.root, data.image_size); classes and sizes from the folder")


@register_dataset(PLACEHOLDER)
def _not_in_memory(root: Path) -> tuple[Split, Split]:
    raise DataUnavailable("image_folder is streamed from disk, not loaded into memory: use "
                          "pai_core.data.image_folder.bundle (stages do, through bundle_for)")


class FolderError(ValueError):
    """A root that cannot serve as an image folder; the message names `data.root`."""


@dataclass(frozen=True, eq=False)
class FolderIndex:
    """The file lists of one folder. Paths are relative to their split's folder and kept as
    one numpy bytes array per split, not a Python list: forked loader workers then share it
    instead of copying it page by page as reference counts are touched."""
    root: Path
    classes: tuple[str, ...]
    train_files: np.ndarray  # bytes, relative to root/train, in (class, path) order
    train_labels: np.ndarray  # int64
    test_dir: Path
    test_files: np.ndarray
    test_labels: np.ndarray
    fingerprint: str  # of the relative paths and labels of both splits: what the data is

    @property
    def name(self) -> str:
        return self.root.name


def resolve_root(root: str | os.PathLike[str]) -> Path:
    """`data.root` as a folder: `~` expanded, relative paths under PAI_DATA, links resolved."""
    path = Path(root).expanduser()
    if not path.is_absolute():
        path = data_root() / path
    return path.resolve()


def _images(folder: Path) -> list[str]:
    """Image files under `folder`, recursively (Tiny-ImageNet nests them in images/), as
    sorted posix paths relative to it; hidden files and folders are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        found += [(rel / f).as_posix() for f in filenames
                  if not f.startswith(".") and f.lower().endswith(EXTENSIONS)]
    return sorted(found)


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _stamp(root: Path) -> tuple:
    """What changes when files are added to or removed from the class folders themselves: a
    listing is reused while it is the same (listing ImageNet means 1.33 million entries; this
    is 2,000 stats)."""
    out = []
    for split in ("train", "val"):
        d = root / split
        if d.is_dir():
            out.append(d.stat().st_mtime_ns)
            out += [(e.name, e.stat().st_mtime_ns) for e in os.scandir(d)]
    return tuple(out)


def scan(root: Path) -> FolderIndex:
    """The folder's classes and file lists; refuses anything that is not a usable folder,
    naming `data.root`, before any compute."""
    root = Path(root)
    try:
        return _listed(root)
    except OSError as e:  # unreadable, a name too long, ...
        raise FolderError(f"data.root: cannot read {str(root)[:200]}: {e.strerror or e}") from None


def _listed(root: Path) -> FolderIndex:
    if not root.is_dir():
        raise FolderError(f"data.root: {root} is not a folder (expected train/<class>/... and val/<class>/...)")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FolderError(f"data.root: {root} has no {split}/ folder (expected train/<class>/<images> and "
                              "val/<class>/<images>)")
    now = time.monotonic()
    seen = _STAMPS.get(root)
    if seen is None or now - seen[0] > STAMP_SECONDS:  # a plan asks once per node: stat at most every 2 s
        seen = _STAMPS[root] = (now, _stamp(root))
    return _scan(root, seen[1])


_STAMPS: dict[Path, tuple[float, tuple]] = {}


@functools.lru_cache(maxsize=4)
def _scan(root: Path, stamp: tuple) -> FolderIndex:
    train_dir, val_dir = root / "train", root / "val"
    classes = _subfolders(train_dir)
    if not classes:
        raise FolderError(f"data.root: {train_dir} has no class folders (expected train/<class>/<images>)")
    lines, files, labels = [], [], []
    for c, name in enumerate(classes):
        found = _images(train_dir / name)
        if not found:
            raise FolderError(f"data.root: class folder {train_dir / name} holds no images ({', '.join(EXTENSIONS)})")
        files += [f"{name}/{f}" for f in found]
        labels += [c] * len(found)
    lines += [f"train\t{c}\t{f}" for f, c in zip(files, labels)]
    test_files, test_labels = _val(val_dir, classes)
    lines += [f"val\t{c}\t{f}" for f, c in zip(test_files, test_labels)]
    digest = hashlib.sha256(os.fsencode("\n".join(lines))).hexdigest()[:16]
    as_bytes = lambda xs: np.array([os.fsencode(x) for x in xs], dtype=bytes)  # noqa: E731
    return FolderIndex(root, tuple(classes), as_bytes(files), np.array(labels, dtype=np.int64), val_dir,
                       as_bytes(test_files), np.array(test_labels, dtype=np.int64), digest)


def _val(val_dir: Path, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    """The test split: val/<class>/... folders, or Tiny-ImageNet's images/ + val_annotations.txt."""
    index = {c: i for i, c in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    annotations = val_dir / TINY_ANNOTATIONS
    if annotations.is_file():
        for n, line in enumerate(annotations.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise FolderError(f"data.root: {annotations} line {n}: expected '<file>\\t<train class>' "
                                  f"(got {line[:80]!r})")
            rel = f"images/{parts[0]}"
            if not (val_dir / rel).is_file():
                raise FolderError(f"data.root: {annotations} line {n}: no file {val_dir / rel}")
            files.append(rel)
            labels.append(index[parts[1]])
        order = sorted(range(len(files)), key=lambda i: files[i])
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    else:
        for name in _subfolders(val_dir):
            if name not in index:
                raise FolderError(f"data.root: {val_dir / name} is a class that train/ does not have")
            found = _images(val_dir / name)
            files += [f"{name}/{f}" for f in found]
            labels += [index[name]] * len(found)
    if not files:
        raise FolderError(f"data.root: {val_dir} holds no images (expected val/<class>/<images>)")
    return files, labels


def default_val_size(train_size: int) -> int:
    """A tenth of train, at most 10,000 (ImageNet: 10,000 of 1.28 M; Tiny-ImageNet: 10,000 of
    100,000); the official val folder is the test split, so validation must come from train."""
    return max(1, min(MAX_DEFAULT_VAL, train_size // 10))


def folder_info(index: FolderIndex, image_size: int) -> DatasetInfo:
    n = len(index.train_files)
    return DatasetInfo(NAME, (3, image_size, image_size), len(index.classes), train_size=n,
                       default_val_size=default_val_size(n))


def remember(root: Path) -> None:
    """Record a validated folder in PAI_IMAGE_FOLDERS, so that stages of this process and of
    worker processes it starts later (a local Dask cluster) find it by name and fingerprint."""
    known = [p for p in os.environ.get(FOLDERS_ENV, "").split(os.pathsep) if p]
    if str(root) not in known:
        os.environ[FOLDERS_ENV] = os.pathsep.join([*known, str(root)])


def locate(name: str, fingerprint: str) -> FolderIndex:
    """The folder a stage reads: the first candidate named `name` whose files match the
    fingerprint the stage was keyed on. Candidates: PAI_IMAGE_FOLDERS, then PAI_DATA/<name>."""
    candidates = [Path(p) for p in os.environ.get(FOLDERS_ENV, "").split(os.pathsep) if p]
    candidates.append(data_root() / name)
    mismatched = []
    for path in candidates:
        path = path.expanduser().resolve()
        if path.name != name or not path.is_dir():
            continue
        try:
            index = scan(path)
        except FolderError:
            continue
        if index.fingerprint == fingerprint:
            return index
        mismatched.append(str(path))
    why = f" ({', '.join(mismatched)} hold other files)" if mismatched else ""
    raise DataUnavailable(
        f"data.root: no folder named {name!r} with the files this stage was keyed on (fingerprint {fingerprint}) "
        f"on this machine{why}. Put it at {data_root() / name} or list its path in {FOLDERS_ENV}")


@dataclass(frozen=True, eq=False)
class FolderSplit:
    """One split of an image folder: a file list and how it is loaded, in place of `Split`'s
    tensors. `train`: the random training transform (else the deterministic eval one)."""
    dataset: FolderDataset
    workers: int = 0
    pin_memory: bool = False

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def train(self) -> bool:
        return self.dataset.train


def subset(index: FolderIndex, rows: torch.Tensor | None, size: int, train: bool, workers: int,
           pin: bool, crop: Crop = DEFAULT_CROP) -> FolderSplit:
    """A split of train (rows of it, ascending) or, with rows None, the test split."""
    if rows is None:
        ds = FolderDataset(index.test_dir, index.test_files, index.test_labels, size, train, crop)
    else:
        r = rows.numpy()
        ds = FolderDataset(index.root / "train", index.train_files[r], index.train_labels[r], size, train, crop)
    return FolderSplit(ds, workers, pin)


def bundle(index: FolderIndex, *, image_size: int, val_size: int, split_seed: int, workers: int = 0,
           pin_memory: bool = False, crop: Crop = DEFAULT_CROP) -> DataBundle:
    """Train (random transform: RandomResizedCrop in `crop`'s area and aspect ranges, then a
    flip), val and test (eval transform) as streamed splits."""
    train_idx, val_idx = split_indices(len(index.train_files), val_size, split_seed)
    return DataBundle(
        name=NAME,
        train=subset(index, train_idx, image_size, True, workers, pin_memory, crop),
        val=subset(index, val_idx, image_size, False, workers, pin_memory),
        test=subset(index, None, image_size, False, workers, pin_memory),
        in_shape=(3, image_size, image_size),
        num_classes=len(index.classes),
    )

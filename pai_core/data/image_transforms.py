"""The ImageNet transforms of `image_folder`, and the dataset that decodes one file per item:
the torchvision / He et al. recipe, written here so that its randomness is seeded per example,
never from a global or worker RNG.

- train: RandomResizedCrop(size; area 8-100 %, aspect 3/4-4/3 log-uniform, 10 tries, then the
  centre crop clamped to that aspect) + horizontal flip (p = 0.5);
- eval: Resize(shorter side to round(size * 256 / 224)) + CenterCrop(size);
- both then ToTensor + Normalize(ImageNet mean/std), done on the device (pai_core.data.stream):
  workers ship uint8, a quarter of the bytes, and the arithmetic is the same.

References differ: OpenLTH's ImageNet uses RandomResizedCrop(224, scale=(0.1, 1), ratio=(0.8,
1.25)); SynFlow's Tiny-ImageNet uses RandomCrop(64, padding=4) + flip with Tiny-ImageNet
statistics. We follow the torchvision / pytorch-examples defaults for both sizes.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import torch

MEAN = (0.485, 0.456, 0.406)  # ImageNet per-channel statistics, as torchvision's models use
STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)  # RandomResizedCrop: fraction of the image area
RATIO = (3 / 4, 4 / 3)  # and aspect ratio (w / h), drawn log-uniformly
Crop = tuple[tuple[float, float], tuple[float, float]]  # (scale, ratio): data.crop_scale, data.crop_ratio
DEFAULT_CROP: Crop = (SCALE, RATIO)
CROP_TRIES = 10
RESIZE_FOR_EVAL = 256 / 224  # Resize(256) + CenterCrop(224), at every size


def crop_box(width: int, height: int, rng: random.Random, crop: Crop = DEFAULT_CROP) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h): area uniform in crop's scale range (SCALE) of
    the image, aspect log-uniform in its ratio range (RATIO), CROP_TRIES tries; else the centre
    crop clamped to the ratio range."""
    (s_lo, s_hi), (r_lo, r_hi) = crop
    area = width * height
    lo, hi = math.log(r_lo), math.log(r_hi)
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(s_lo, s_hi)
        aspect = math.exp(rng.uniform(lo, hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    ratio = width / height
    if ratio < r_lo:
        w, h = width, round(width / r_lo)
    elif ratio > r_hi:
        w, h = round(height * r_hi), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_image(img, size: int, seed: int, crop: Crop = DEFAULT_CROP):  # PIL.Image -> PIL.Image
    """RandomResizedCrop(size, scale, ratio) + RandomHorizontalFlip, every draw from `seed`."""
    from PIL import Image

    rng = random.Random(seed)
    left, top, w, h = crop_box(img.width, img.height, rng, crop)
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def eval_image(img, size: int):  # PIL.Image -> PIL.Image
    """Resize the shorter side to round(size * 256/224), then the centre size×size crop."""
    from PIL import Image

    short = round(size * RESIZE_FOR_EVAL)
    w, h = img.size
    if w <= h:
        new = (short, int(short * h / w))
    else:
        new = (int(short * w / h), short)
    img = img.resize(new, Image.BILINEAR)
    left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    return img.crop((left, top, left + size, top + size))


def to_uint8(img) -> torch.Tensor:
    """PIL RGB image -> 3×H×W uint8 (ToTensor without the /255, done on the device)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×H×W -> ToTensor + Normalize(MEAN, STD), in float32 on x's device: the same
    operations torchvision does per image, so the same numbers. The statistics are copied to
    a device once, not per batch (a copy from pageable memory would make the host wait)."""
    if x.device not in _STATS:
        _STATS[x.device] = (torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1),
                            torch.tensor(STD, device=x.device).view(1, 3, 1, 1))
    mean, std = _STATS[x.device]
    return x.float().div_(255).sub_(mean).div_(std)


class FolderDataset(torch.utils.data.Dataset):
    """Decodes one file per item. Train items are (file index, seed): the seed decides the
    crop and flip, so an item is a pure function of its arguments in any worker."""

    def __init__(self, base: Path, files: np.ndarray, labels: np.ndarray, size: int, train: bool,
                 crop: Crop = DEFAULT_CROP):
        self.base, self.files, self.labels, self.size, self.train = str(base), files, labels, size, train
        self.crop = crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        i, seed = item if self.train else (item, None)
        with Image.open(os.path.join(self.base, os.fsdecode(self.files[i]))) as f:
            img = f.convert("RGB")
        img = train_image(img, self.size, seed, self.crop) if self.train else eval_image(img, self.size)
        return to_uint8(img), int(self.labels[i])

"""Tiny deterministic datasets for smoke tests and CI: no files, no network, < 0.1 s.

Each class is a fixed random prototype image plus Gaussian noise, so a small MLP learns it
in a few epochs, yet the noise keeps it from being solved by a single weight. `synthetic`
is 1×16×16; `synthetic_cifar` is CIFAR-shaped (3×32×32, crop+flip by default, as CIFAR), so
a CIFAR recipe runs end to end with `data.dataset=synthetic_cifar` where CIFAR cannot be
downloaded (CI, the GPU machine).
"""
from __future__ import annotations

from pathlib import Path

import torch

from pai_core.data.registry import DatasetInfo, Split, register_dataset

SYNTHETIC_INFO = DatasetInfo("synthetic", (1, 16, 16), 10, train_size=1200, default_val_size=200)
SYNTHETIC_CIFAR_INFO = DatasetInfo("synthetic_cifar", (3, 32, 32), 10, train_size=1000, default_val_size=100,
                                   default_augment=("crop", "flip"))
SEED = 20240501
TEST_SIZE = 300
PROTOTYPE_SCALE = 0.3  # prototype amplitude relative to unit pixel noise


def make_synthetic(seed: int = SEED, info: DatasetInfo = SYNTHETIC_INFO) -> tuple[Split, Split]:
    gen = torch.Generator().manual_seed(seed)
    c, (ch, h, w) = info.num_classes, info.in_shape
    prototypes = PROTOTYPE_SCALE * torch.randn(c, ch, h, w, generator=gen)

    def draw(n: int) -> Split:
        y = torch.randperm(n, generator=gen) % c  # balanced classes, shuffled order
        x = prototypes[y] + torch.randn(n, ch, h, w, generator=gen)
        return Split(x, y.to(torch.int64))

    train, test = draw(info.train_size), draw(TEST_SIZE)
    mean, std = train.x.mean(), train.x.std()
    norm = lambda s: Split(((s.x - mean) / std).to(torch.float32), s.y)  # noqa: E731
    return norm(train), norm(test)


@register_dataset(SYNTHETIC_INFO)
def load_synthetic(root: Path) -> tuple[Split, Split]:
    return make_synthetic()


@register_dataset(SYNTHETIC_CIFAR_INFO)
def load_synthetic_cifar(root: Path) -> tuple[Split, Split]:
    return make_synthetic(SEED + 1, SYNTHETIC_CIFAR_INFO)

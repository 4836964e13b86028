"""MNIST and Fashion-MNIST (1×28×28, 10 classes), read from provisioned raw IDX files.

torchvision's `.data` / `.targets` give the whole split as one uint8 tensor, which avoids
the per-sample PIL path that makes dataset iteration slow.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pai_core.data import provision
from pai_core.data.registry import DatasetInfo, Split, register_dataset

# 5000 validation examples held out of the 60000, as in the lottery-ticket paper.
MNIST_INFO = DatasetInfo("mnist", (1, 28, 28), 10, train_size=60000, default_val_size=5000)
FASHION_INFO = DatasetInfo(
    "fashion_mnist", (1, 28, 28), 10, train_size=60000, default_val_size=5000
)


def _read(spec: provision.RawSpec, root: Path, mean: float, std: float) -> tuple[Split, Split]:
    provision.ensure_raw(spec, root)
    import torchvision.datasets  # deferred: importing torchvision costs ~1 s

    cls = getattr(torchvision.datasets, spec.folder)
    splits = []
    for train in (True, False):
        ds = cls(str(root), train=train, download=False)
        x = ds.data.unsqueeze(1).to(torch.float32).div_(255.0).sub_(mean).div_(std)
        splits.append(Split(x.contiguous(), ds.targets.to(torch.int64)))
    return splits[0], splits[1]


@register_dataset(MNIST_INFO)
def load_mnist(root: Path) -> tuple[Split, Split]:
    return _read(provision.MNIST_RAW, root, 0.1307, 0.3081)


@register_dataset(FASHION_INFO)
def load_fashion_mnist(root: Path) -> tuple[Split, Split]:
    return _read(provision.FASHION_RAW, root, 0.2860, 0.3530)

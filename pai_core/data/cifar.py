"""CIFAR-10 (3×32×32, 10 classes) through torchvision's normal download path.

No package registry ships CIFAR-10, so without internet (and without a pre-filled
`<root>/cifar-10-batches-py`) it is unavailable. No augmentation here: that belongs to
training, and the split tensors must stay deterministic.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pai_core.data.registry import DatasetInfo, DataUnavailable, Split, register_dataset

CIFAR10_INFO = DatasetInfo("cifar10", (3, 32, 32), 10, train_size=50000, default_val_size=5000)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@register_dataset(CIFAR10_INFO)
def load_cifar10(root: Path) -> tuple[Split, Split]:
    import torchvision.datasets

    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=True)
        except Exception as exc:  # URLError, RuntimeError (corrupt / missing files), ...
            raise DataUnavailable(
                f"CIFAR-10 could not be downloaded or verified under {root}: {exc}. "
                "No package registry ships it: give this machine internet access once, or copy "
                f"torchvision's `cifar-10-batches-py` folder into {root}."
            ) from exc
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        splits.append(Split(x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1]

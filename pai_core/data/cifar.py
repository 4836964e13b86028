"""CIFAR-10 and CIFAR-100 (3×32×32; 10 and 100 classes) through torchvision's normal download path.

No package registry ships them, so without internet (and without a pre-filled
`<root>/cifar-10-batches-py` or `<root>/cifar-100-python`) they are unavailable. The split
tensors stay deterministic: augmentation (random crop + flip, the default for both) is done
by training on the device (pai_core.augment), never here, and never at evaluation.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pai_core.data.registry import DatasetInfo, DataUnavailable, Split, register_dataset

CIFAR_AUGMENT = ("crop", "flip")  # He et al. 2016 / OpenLTH: RandomCrop(32, padding=4), horizontal flip

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
MEAN_100 = (0.5071, 0.4865, 0.4409)  # per-channel pixel statistics of the CIFAR-100 train split
STD_100 = (0.2673, 0.2564, 0.2762)


def black(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[float, ...]:
    """A black pixel after Normalize: the value the reference's crop padding ends up as."""
    return tuple(-m / s for m, s in zip(mean, std))


CIFAR10_INFO = DatasetInfo("cifar10", (3, 32, 32), 10, train_size=50000, default_val_size=5000,
                           default_augment=CIFAR_AUGMENT, crop_fill=black(MEAN, STD))
CIFAR100_INFO = DatasetInfo("cifar100", (3, 32, 32), 100, train_size=50000, default_val_size=5000,
                            default_augment=CIFAR_AUGMENT, crop_fill=black(MEAN_100, STD_100))


def _load(cls_name: str, title: str, folder: str, root: Path,
          mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Split, Split]:
    import torchvision.datasets

    splits = []
    for train in (True, False):
        try:
            ds = getattr(torchvision.datasets, cls_name)(str(root), train=train, download=True)
        except Exception as exc:  # URLError, RuntimeError (corrupt / missing files), ...
            raise DataUnavailable(
                f"{title} could not be downloaded or verified under {root}: {exc}. "
                "No package registry ships it: give this machine internet access once, or copy "
                f"torchvision's `{folder}` folder into {root}."
            ) from exc
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        splits.append(Split(x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1]


@register_dataset(CIFAR10_INFO)
def load_cifar10(root: Path) -> tuple[Split, Split]:
    return _load("CIFAR10", "CIFAR-10", "cifar-10-batches-py", root, MEAN, STD)


@register_dataset(CIFAR100_INFO)
def load_cifar100(root: Path) -> tuple[Split, Split]:
    """The 100 fine labels (torchvision's `targets`), not the 20 coarse superclasses."""
    return _load("CIFAR100", "CIFAR-100", "cifar-100-python", root, MEAN_100, STD_100)

"""Datasets with a reproducible train/val/test split: in-memory tensors (MNIST, CIFAR, ...),
or `image_folder`, files streamed from disk by DataLoader workers (pai_core.data.stream).

Adding a dataset: one module with a `@register_dataset(info)` loader, plus its import below.
"""
from pai_core.data.registry import (
    DataBundle,
    DatasetInfo,
    DataUnavailable,
    Split,
    clear_cache,
    dataset_info,
    dataset_names,
    load,
    register_dataset,
    split_indices,
)

# Imported for their registration side effect.
from pai_core.data import mnist, cifar, synthetic, image_folder  # noqa: E402,F401  isort: skip

__all__ = [
    "DataBundle",
    "DatasetInfo",
    "DataUnavailable",
    "Split",
    "clear_cache",
    "dataset_info",
    "dataset_names",
    "load",
    "register_dataset",
    "split_indices",
]

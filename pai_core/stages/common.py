"""What several stages share: data on the right device, a model rebuilt from a ref, the
stage's own seeded generator, and the layer-collapse check."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from pai_core import data as data_lib
from pai_core.data import image_folder, image_transforms
from pai_core.data.stream import default_workers, train_batches
from pai_core.collapse import LayerCollapse, collapse_report, describe
from pai_core.infos import Arch
from pai_core.masks import Mask, sparsity
from pai_core.models import build_model
from pai_core.stages.registry import Runtime
from pai_core.store import Ref

log = logging.getLogger("pai_core.stages")


@lru_cache(maxsize=4)
def _bundle(dataset: str, val_size: int, split_seed: int, device: str) -> data_lib.DataBundle:
    b = data_lib.load(dataset, val_size=val_size, split_seed=split_seed)
    if device == "cpu":
        return b
    move = lambda s: data_lib.Split(s.x.to(device), s.y.to(device))  # noqa: E731
    return data_lib.DataBundle(b.name, move(b.train), move(b.val), move(b.test), b.in_shape, b.num_classes)


@lru_cache(maxsize=2)
def _folder_bundle(name: str, files: str, image_size: int, val_size: int, split_seed: int, device: str,
                   workers: int, crop: tuple[tuple[float, float], tuple[float, float]]) -> data_lib.DataBundle:
    """An image folder's streamed splits (file lists, not tensors), found on this machine by
    its name and fingerprint; cached like the tensors, with their evaluation loaders."""
    return image_folder.bundle(image_folder.locate(name, files), image_size=image_size, val_size=val_size,
                               split_seed=split_seed, workers=workers, pin_memory=device.startswith("cuda"),
                               crop=crop)


def bundle_for(fields: Mapping[str, Any], rt: Runtime) -> data_lib.DataBundle:
    if fields["dataset"] == image_folder.NAME:
        crop = (tuple(fields.get("crop_scale", image_transforms.SCALE)), tuple(fields.get("crop_ratio",
                                                                                         image_transforms.RATIO)))
        return _folder_bundle(fields["root"], fields["files"], fields["image_size"], fields["val_size"],
                              fields["split_seed"], str(rt.torch_device), default_workers(), crop)
    return _bundle(fields["dataset"], fields["val_size"], fields["split_seed"], str(rt.torch_device))


def build_arch(arch: Arch, seed: int = 0) -> nn.Module:
    """The registered model of `arch` (its params included); seed 0 when only the shape matters."""
    params = {k: v for k, v in arch.model.items() if k != "name"}
    return build_model(arch.model["name"], tuple(arch.in_shape), arch.num_classes, seed=seed, **params)


def model_from(ref: Ref, payload: dict[str, Any], rt: Runtime) -> nn.Module:
    model = build_arch(ref.info.arch)
    model.load_state_dict(payload["model"])
    return model.to(rt.torch_device)


def generator(key: str) -> torch.Generator:
    """A stage's own random stream, seeded by its key: same key, same draws."""
    return torch.Generator().manual_seed(int(key[:15], 16))


def first_batches(d: Mapping[str, Any], rt: Runtime) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches in the order training itself would see them first (epoch 0). An image
    folder's are the very batches training reads (random crops and flips included), as
    SynFlow's reference scores on its augmented training loader."""
    b = bundle_for(d, rt)
    ipe = math.ceil(len(b.train) / d["batch_size"])
    yield from train_batches(b, 0, ipe, d["batch_size"], d["order_seed"], rt.torch_device)


def batch_stream(d: Mapping[str, Any], rt: Runtime) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training batches in training order, epoch after epoch, without end: rounds that each
    need new batches share one stream."""
    yield from train_batches(bundle_for(d, rt), 0, None, d["batch_size"], d["order_seed"], rt.torch_device)


def check_collapse(mask: Mask, model: nn.Module, in_shape: tuple[int, ...], policy: str,
                   best: float | None) -> dict[str, Any]:
    """Diagnose the mask; refuse it (raise) or warn, as `prune.on_collapse` says."""
    report = collapse_report(model, mask, in_shape)
    if report["collapsed"]:
        msg = f"mask at sparsity {sparsity(mask):.4f} collapses the network: {describe(report)}"
        if best is not None:
            msg += f"; the highest sparsity reached without collapse was {best:.4f}"
        if policy == "error":
            raise LayerCollapse(msg + ". Lower the sparsity, set prune.min_density, or prune.on_collapse: warn")
        log.warning(msg)
    return report

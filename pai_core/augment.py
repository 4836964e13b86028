"""Training-time augmentation applied to batch tensors on their own device.

The CIFAR standard (He et al. 2016; Frankle & Carbin's OpenLTH `datasets/cifar10.py`):
random crop with 4-pixel padding and horizontal flip with p = 0.5. The reference applies
them to PIL images before `Normalize`, so its padding is black; the data here is already
normalised, so the caller passes the normalised value of black per channel as `fill`
(`DatasetInfo.crop_fill`): the padded border then matches the reference exactly, rather
than being the mean colour that a zero in normalised space would be.

Draws come from a CPU generator seeded by (order_seed, iteration) (`generator_at`), so
iteration i's augmentation is a pure function of (seed, i): a resumed or rewound training
replays it exactly, and CPU and CUDA runs draw the same crops and flips. Only the small
draw tensors cross to the device (pinned, non-blocking: no host sync per step); the images
are cropped and flipped by one gather, with no per-example Python loop.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

KINDS = ("crop", "flip")  # also the order they are applied in
PAD = 4  # pixels on each side before the random crop (RandomCrop(32, padding=4))


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """`kinds` in canonical order; unknown or repeated kinds are refused naming `data.augment`."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"data.augment: unknown kind {bad[0]!r}; allowed: {', '.join(KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"data.augment: each kind at most once (got {list(kinds)}); allowed: {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in kinds)


def generator_at(order_seed: int, iteration: int) -> torch.Generator:
    """The CPU generator of one iteration's draws. Hashed, so its stream never coincides with
    `training.epoch_order`'s generators (seeded by order_seed * 1_000_003 + epoch)."""
    digest = hashlib.blake2b(f"augment:{order_seed}:{iteration}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") % 2**63)


def draw(n: int, kinds: Sequence[str], generator: torch.Generator,
         pad: int = PAD) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(offsets, flips) for n examples: offsets n×2 (top, left) in 0..2·pad of the padded
    image, as RandomCrop draws them; flips n booleans with p = 0.5. None for a kind not asked.
    Always drawn in this order, so adding flip does not change the crops."""
    kinds = check_kinds(kinds)
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator) if "crop" in kinds else None
    flips = torch.rand(n, generator=generator) < 0.5 if "flip" in kinds else None
    return offsets, flips


def apply(x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None, pad: int = PAD,
          fill: float | Sequence[float] = 0.0) -> torch.Tensor:
    """Crop each N×C×H×W example at its offset from the image padded by `pad` pixels of `fill`
    (one value, or one per channel), then mirror the flipped ones; both as one gather."""
    n, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).expand(n, h)
    cols = torch.arange(w, device=dev).expand(n, w)
    if flips is not None:
        cols = torch.where(flips.to(dev).view(n, 1), w - 1 - cols, cols)
    if offsets is not None:
        offsets = offsets.to(dev)
        rows, cols = rows + offsets[:, :1], cols + offsets[:, 1:]
        fills = [float(fill)] * c if isinstance(fill, (int, float)) else [float(v) for v in fill]
        if len(fills) != c:
            raise ValueError(f"fill: one value or one per channel ({c}), got {len(fills)}")
        padded = x.new_empty(n, c, h + 2 * pad, w + 2 * pad)
        for ch, v in enumerate(fills):  # Python scalars: no host-to-device copy, no sync
            padded[:, ch].fill_(v)
        padded[:, :, pad:pad + h, pad:pad + w] = x
    elif flips is None:
        return x
    else:
        padded = x
    return padded[torch.arange(n, device=dev).view(n, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1),
                  rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def augment_batch(x: torch.Tensor, kinds: Sequence[str], generator: torch.Generator, pad: int = PAD,
                  fill: float | Sequence[float] = 0.0) -> torch.Tensor:
    """A new, augmented N×C×H×W batch on x's device; `x` is not changed. Evaluation never calls it."""
    if not kinds:
        return x
    offsets, flips = draw(x.shape[0], kinds, generator, pad)
    if x.is_cuda:  # pinned + non_blocking: the copy is queued, the host does not wait for the GPU
        offsets = None if offsets is None else offsets.pin_memory().to(x.device, non_blocking=True)
        flips = None if flips is None else flips.pin_memory().to(x.device, non_blocking=True)
    return apply(x, offsets, flips, pad, fill)

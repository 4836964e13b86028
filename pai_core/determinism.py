"""What keeps a training bit-exact on its device, and where it is let go: deterministic CUDA
kernels (on by default, off for one training with `train.deterministic: false`), and dropout
draws made a function of the iteration, so resuming and rewinding replay the same steps."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    """`auto` = CUDA when present. On CUDA, deterministic kernels are switched on: resuming
    and rewinding are only exact if the same steps give the same numbers. A training with
    `train.deterministic: false` lifts this for its own duration only (`fast_kernels`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
        _deterministic_cuda()
    return torch.device(name)


def _deterministic_cuda() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextmanager
def fast_kernels() -> Iterator[None]:
    """Nondeterministic, autotuned kernels (cuDNN benchmark) inside the block; the previous
    settings are restored after it. Faster convolutions, but the same steps no longer give
    bit-identical numbers, so a resumed or rewound CUDA run is not bit-exact."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


@contextmanager
def dropout_rng(model: nn.Module, device: torch.device, order_seed: int) -> Iterator[Any]:
    """Dropout draws from torch's global generator, which no checkpoint holds and whose state
    depends on what ran earlier in the process. For a model with dropout, the generator is
    reseeded from (order_seed, iteration) before every step, so a resumed or rewound run
    draws the same masks; the caller's generator state is restored afterwards. Yields the
    per-step seeding function, or None for a model without dropout (nothing changes)."""
    if not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        yield None
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        def seed_step(it: int) -> None:
            seed = (order_seed * 1_000_003 + it) ^ 0xD50_90A7
            torch.default_generator.manual_seed(seed % 2**63)
            if cuda:
                torch.cuda.default_generators[device.index or 0].manual_seed(seed % 2**63)
        yield seed_step

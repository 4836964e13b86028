"""Training callbacks a train node asks for by field name, so a paradigm that changes how
training runs (a mask that moves, an early stop) registers its callback in its own file and
the train stage stays as it is.

A train node whose fields hold `dynamic`, `gradual`, `early_bird`... gets the callback
registered under that name, built from the field's value, the run's total iterations and
the node's key (a seed for its draws)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from pai_core.masks import Mask
from pai_core.training import Callback, TrainState


class MaskUpdater(Protocol):
    """Changes the mask during training when `due` (SET/RigL regrowth, a gradual ramp)."""
    updates: list[dict[str, float]]

    def due(self, it: int) -> bool: ...
    def __call__(self, it: int, model: nn.Module, opt: torch.optim.Optimizer, mask: Mask) -> Mask: ...


class MaskUpdate(Callback):
    """A `MaskUpdater` as a callback: after backward (dense gradients), before the masked step.
    An updater whose `skip_step_on_update` is true (RigL's reference) skips that step."""

    def __init__(self, updater: MaskUpdater):
        self.updater = updater

    def after_backward(self, state: TrainState) -> None:
        if self.updater.due(state.it):
            state.mask = self.updater(state.it, state.model, state.opt, state.mask)
            state.skip_step = bool(getattr(self.updater, "skip_step_on_update", False))

    def state_dict(self) -> dict[str, Any]:
        return {"updates": list(self.updater.updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updater.updates[:] = state.get("updates", [])

    def record(self) -> dict[str, Any]:
        return {"mask_updates": self.updater.updates}


Factory = Callable[[Any, int, str], Callback]  # (the field's value, total iterations, node key)
_FACTORIES: dict[str, Factory] = {}


def register_callback(field: str) -> Callable[[Factory], Factory]:
    def deco(fn: Factory) -> Factory:
        if field in _FACTORIES:
            raise ValueError(f"a training callback for field {field!r} is already registered")
        _FACTORIES[field] = fn
        return fn
    return deco


def asks_for_callbacks(fields: Mapping[str, Any]) -> bool:
    """Whether a train node's fields name a registered callback: the train stage then stores the
    final mask in its payload, since the callback may have moved it."""
    import pai_core.paradigms  # noqa: F401  (paradigms register their callbacks on import)

    return any(fields.get(name) for name in _FACTORIES)


def callbacks_for(fields: Mapping[str, Any], total: int, key: str) -> list[Callback]:
    import pai_core.paradigms  # noqa: F401  (paradigms register their callbacks on import)

    return [make(fields[name], total, key) for name, make in _FACTORIES.items() if fields.get(name)]

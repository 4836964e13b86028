"""A progress hook the training loop calls, so the CLI can draw bars and the flows can log
live curves (MLflow, Prefect) without pai_core knowing about rich, MLflow or Prefect.
The default does nothing."""
from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    def start(self, label: str, total: int, done: int) -> None: ...
    def update(self, done: int, **metrics: Any) -> None: ...
    def epoch(self, row: dict[str, float]) -> None: ...  # one evaluated epoch: iteration, losses, accuracies, lr
    def finish(self) -> None: ...


class NullProgress:
    def start(self, label: str, total: int, done: int) -> None:
        pass

    def update(self, done: int, **metrics: Any) -> None:
        pass

    def epoch(self, row: dict[str, float]) -> None:
        pass

    def finish(self) -> None:
        pass


class Fanout:
    """Several watchers as one (the CLI's bars and a live MLflow run)."""

    def __init__(self, *watchers: Progress):
        self.watchers = watchers

    def start(self, label: str, total: int, done: int) -> None:
        for w in self.watchers:
            w.start(label, total, done)

    def update(self, done: int, **metrics: Any) -> None:
        for w in self.watchers:
            w.update(done, **metrics)

    def epoch(self, row: dict[str, float]) -> None:
        for w in self.watchers:
            w.epoch(row)

    def finish(self) -> None:
        for w in self.watchers:
            w.finish()


_current: Progress = NullProgress()


def set_progress(p: Progress | None) -> None:
    global _current
    _current = p or NullProgress()


def get_progress() -> Progress:
    return _current

"""A progress hook the training loop calls, so the CLI can draw bars without pai_core
knowing about rich (or anything else). The default does nothing."""
from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    def start(self, label: str, total: int, done: int) -> None: ...
    def update(self, done: int, **metrics: Any) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    def start(self, label: str, total: int, done: int) -> None:
        pass

    def update(self, done: int, **metrics: Any) -> None:
        pass

    def finish(self) -> None:
        pass


_current: Progress = NullProgress()


def set_progress(p: Progress | None) -> None:
    global _current
    _current = p or NullProgress()


def get_progress() -> Progress:
    return _current

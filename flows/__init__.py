"""Prefect flows generated from the paradigm registry, plus sweep and report.

Importing the package applies pai-flow's environment defaults and nothing heavier: the
flows themselves (and so Prefect) load on first use of `FLOWS`, which keeps `pai server
status` and `pai validate` fast. `flows.<paradigm>` modules (deployment entrypoints such as
`flows.lottery_ticket:lottery_ticket`) are made on demand from the generated flows.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

from flows.env import apply_defaults

apply_defaults()


def __getattr__(name: str) -> Any:
    if name == "FLOWS":
        from flows.paradigm_flows import FLOWS

        return FLOWS
    raise AttributeError(name)


class _ParadigmModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import flows.lottery_ticket` gives a module whose `lottery_ticket` is the generated flow."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.partition(".")
        if prefix != "flows" or "." in name or not name:
            return None
        from pai_core.paradigms import paradigm_names

        return importlib.machinery.ModuleSpec(fullname, self) if name in paradigm_names() else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        from flows.paradigm_flows import FLOWS

        name = module.__name__.rsplit(".", 1)[1]
        setattr(module, name, FLOWS[name])


if not any(isinstance(f, _ParadigmModules) for f in sys.meta_path):
    sys.meta_path.append(_ParadigmModules())

"""docs/methods.md must keep a row for every registered method, so a new one cannot go undocumented."""
from __future__ import annotations

from typing import get_args

import pytest

from conftest import ROOT
from pai_core.criteria import criterion_names
from pai_core.dynamic_methods import dynamic_method_names
from pai_core.paradigms import paradigm_names
from pai_core.paradigms.supermask import METHODS, SelectionSpec
from pai_core.specs import SCOPES

SELECTION = sorted(set(METHODS) | set(get_args(SelectionSpec.model_fields["method"].annotation)))
NAMES = {"criterion": criterion_names(), "dynamic method": dynamic_method_names(),
         "selection method": SELECTION, "paradigm": paradigm_names(), "scope": sorted(SCOPES)}


@pytest.mark.parametrize("kind", NAMES)
def test_every_registered_name_is_on_the_methods_page(kind):
    page = (ROOT / "docs" / "methods.md").read_text()
    missing = [n for n in NAMES[kind] if f"`{n}`" not in page]
    assert not missing, f"docs/methods.md lacks a row for {kind} {', '.join(missing)}"

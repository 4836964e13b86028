"""pai_core is a plain library: no orchestration or tracking import, direct or indirect."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_pai_core_never_imports_prefect_or_mlflow():
    modules = sorted(p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
                     for p in (ROOT / "pai_core").rglob("*.py"))
    code = ("import sys\n" + "".join(f"import {m.removesuffix('.__init__')}\n" for m in modules) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow'))\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    pattern = re.compile(r"^\s*(import|from)\s+(prefect|mlflow)\b", re.M)
    assert not [p for p in (ROOT / "pai_core").rglob("*.py") if pattern.search(p.read_text())]

"""Where pai-flow keeps things: one root for artifacts and tracking, one for data.

Two variables because they live differently: the artifact store is per project or per
experiment campaign (tests point it at a temporary folder), while a dataset is provisioned
once per machine and shared by every store.
"""
from __future__ import annotations

import os
from pathlib import Path


def pai_home() -> Path:
    """Root of the artifact store and the default MLflow database (`PAI_HOME`)."""
    return Path(os.environ.get("PAI_HOME", Path.home() / ".pai-flow")).expanduser().resolve()


def data_root() -> Path:
    """Root under which datasets are provisioned in torchvision's layout (`PAI_DATA`)."""
    default = Path.home() / ".pai-flow" / "data"
    return Path(os.environ.get("PAI_DATA", default)).expanduser().resolve()

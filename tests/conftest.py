"""Shared fixtures: every test gets its own artifact store (PAI_HOME); the dataset root
(PAI_DATA) is shared so real MNIST is provisioned once per machine, not per test."""
from __future__ import annotations

from pathlib import Path

import pytest

from pai_core.spec_io import parse_spec
from pai_core.paradigms import ExperimentSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pai_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "pai-home"
    monkeypatch.setenv("PAI_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def tiny_raw(flow: str = "lottery_ticket", **over) -> dict:
    """A spec that trains LeNet-300-100 on the synthetic dataset in well under a second."""
    raw = {
        "flow": flow, "seed": 0, "device": "cpu", "name": "tiny",
        "model": {"name": "lenet_300_100"},
        "data": {"dataset": "synthetic", "batch_size": 50},
        "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 2},
        "prune": {"schedule": "iterative", "rate": 0.2, "rounds": 2},
    }
    if flow == "prune_after_training":
        raw["retrain"] = {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "epochs": 1}
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return raw


def tiny_spec(flow: str = "lottery_ticket", **over) -> ExperimentSpec:
    return parse_spec(tiny_raw(flow, **over))

"""Shared fixtures: every test gets its own artifact store (PAI_HOME); the dataset root
(PAI_DATA) is shared so real MNIST is provisioned once per machine, not per test."""
from __future__ import annotations

import re
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


def crash_and_resume(start, make, spec, tmp_path, crash_at: int = 45) -> dict:
    """One training uninterrupted, and the same killed at iteration `crash_at` (after a
    checkpoint) then resumed by a fresh callback from `make()`: a new process, whose state comes
    only from the checkpoint. `start()` gives (data, model, mask). Returns both runs' callbacks,
    outcomes, models and the mask, for the caller to compare bit for bit."""
    import pytest
    import torch

    from pai_core.training import Callback, train

    class Crash(Callback):
        def after_backward(self, state):
            if state.it == crash_at:
                raise KeyboardInterrupt(f"simulated kill at iteration {crash_at}")

    data, full, mask = start()
    whole = make()
    out = train(full, data, spec, batch_size=50, order_seed=1, mask=mask, callbacks=[whole])
    ckpt = tmp_path / "c.ckpt.pt"
    _, crashed, _ = start()
    with pytest.raises(KeyboardInterrupt):
        train(crashed, data, spec, batch_size=50, order_seed=1, mask=mask, checkpoint=ckpt, callbacks=[make(), Crash()])
    checkpointed = torch.load(ckpt, weights_only=True)["iteration"]
    _, resumed, _ = start()
    again = make()
    out2 = train(resumed, data, spec, batch_size=50, order_seed=1, mask=mask, checkpoint=ckpt, callbacks=[again])
    return {"whole": whole, "out": out, "full": full, "again": again, "out2": out2, "resumed": resumed,
            "mask": mask, "checkpointed": checkpointed}


def random_sparse_start(seed: int, density: float):
    """Synthetic data, a LeNet-300-100 at `seed` and a random mask at `density`: where the
    dynamic methods' training tests start."""
    import torch

    from pai_core.data import load
    from pai_core.masks import dense_mask
    from pai_core.models import build_model
    from pai_core.selection import select

    data = load("synthetic")
    model = build_model("lenet_300_100", data.in_shape, data.num_classes, seed=seed)
    g = torch.Generator().manual_seed(seed)
    dense = dense_mask(model)
    mask = select({n: torch.rand(m.shape, generator=g) for n, m in dense.items()}, dense, density)
    return data, model, mask


def tracked_tiny_run(pai_home: Path, tmp_path: Path) -> tuple[Path, object]:
    """A tiny one-round LTH spec run in process with MLflow tracking, as `pai run` leaves it:
    its YAML path and the MLflow client of its runs (for commands that act on a stored round)."""
    import yaml

    from flows.tracking import Tracking
    from pai_core.executor import InProcess, Job, execute
    from pai_core.paradigms import build_plan
    from pai_core.store import Store

    raw = tiny_raw(train={"epochs": 1}, prune={"rounds": 1})
    spec = parse_spec(raw)
    store = Store(pai_home / "store")
    job = Job(spec, build_plan(spec))
    tracking = Tracking([job], store, None)
    out = execute([job], InProcess(store), store, tracking)
    tracking.tracker(job).finish({"computed": out.computed, "reused": out.reused})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, tracking.tracker(job).client


def loadable_config(path: Path, tmp: Path) -> Path:
    """`path` itself, or for a config that reads an image folder (the ImageNet recipe, `root:
    imagenet` under PAI_DATA) a copy beside a tiny generated folder of that name: validation lists
    the folder before any compute, and no test machine holds ImageNet. Same file name, so the
    spec's name is unchanged."""
    text = path.read_text()
    if "dataset: image_folder" not in text:
        return path
    from test_image_folder import make_folder  # a test module's helper, imported only when needed

    roots = set(re.findall(r"^\s*root: (\S+)\s*$", text, flags=re.M))
    for root in roots:
        if not (tmp / root).exists():
            make_folder(tmp / root, {"train": 12, "val": 3}, size=(24, 24))
    copy = tmp / "configs" / path.name
    copy.parent.mkdir(parents=True, exist_ok=True)
    for root in roots:
        text = re.sub(rf"^(\s*)root: {re.escape(root)}\s*$", rf"\g<1>root: {tmp / root}", text, flags=re.M)
    copy.write_text(text)
    return copy

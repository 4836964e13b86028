"""Fuzz corpus: every bad input is refused by `pai validate` before any compute, with exit 2
and ONE line naming the field; what validates runs (a representative subset, 1 epoch on
synthetic data) without failing after compute has started.

Two parts: the hand-written cases of tests/fuzz/specs.yaml (every finding of the issue
"Nothing lost, nothing trusted blindly", 10-13, and its neighbours), and a generated matrix
that mutates every field of the example configs and of conftest's tiny specs, one at a time:
wrong types, nulls, lists and mappings where scalars go, negative, huge and non-finite
numbers, empty, huge and multi-line strings, unknown fields in every section.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from flows.cli import app
from fuzz.corpus import base_raw, generated, laughs, materialize, mutate, tiny_base, value
from pai_core import yaml_io
from pai_core.spec_io import apply_overrides, load_spec, parse_spec

CASES = yaml.safe_load((Path(__file__).parent / "fuzz" / "specs.yaml").read_text())
SECONDS = 5.0  # per case, refusal included: a bomb or a 100k-character name took 60-100 s before


def check(path: Path, args: list[str], expect: str, match: str | None = None, cmd: str = "validate") -> None:
    """The acceptance invariant: exit 0, or exit 2 with one line naming `expect` (a field; `file`: the path)."""
    t0 = time.perf_counter()
    out = CliRunner().invoke(app, [cmd, str(path), *args])
    took = time.perf_counter() - t0
    text = out.output.strip()
    assert not (out.exception and not isinstance(out.exception, SystemExit)), f"traceback: {out.exception!r}"
    assert took < SECONDS, f"{took:.1f} s"
    if expect in ("ok", "run"):
        assert out.exit_code == 0 and text.startswith("ok: ") and "\n" not in text, text
        return
    assert out.exit_code == 2, text[:300]
    assert "\n" not in text and len(text) < 1200, text[:300]
    head, _, rest = text.partition(" ")
    assert head == "invalid", text[:300]
    where = rest.split(" ", 1)[1]
    named = str(path) if expect == "file" else expect
    plain_field = named.replace(".", "").replace("_", "").isalnum()
    assert where.split(": ", 1)[0] == named or (not plain_field and where.startswith(named)), where[:300]
    if match:
        assert match in where, where[:300]


def _ids(cases: list[dict[str, Any]]) -> list[str]:
    return [c["id"] for c in cases]


def _needs(case: dict[str, Any]) -> None:
    if case.get("needs") == "no_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device cuda is valid here")


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_hand_written_case(case, tmp_path):
    _needs(case)
    path = materialize(case, tmp_path)
    args = [value(a) for a in case.get("args", [])]
    check(path, args, case["expect"], case.get("match"), case.get("cmd", "validate"))


def test_accepted_cases_run(tmp_path):
    """Every `run` case of the corpus, 1 epoch on synthetic data, in one executor (shared stages once)."""
    from pai_core.executor import run_specs
    from pai_core.store import Store

    specs = []
    for i, case in enumerate(c for c in CASES if c["expect"] == "run"):
        d = tmp_path / f"c{i}"
        d.mkdir()
        spec = load_spec(materialize(case, d), [value(a) for a in case.get("args", [])])
        specs.append(spec.model_copy(update={"name": f"{case['id']}"}))
    assert len(specs) >= 15
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: a second thread only spins, and 50x slower on a busy machine
    try:
        out = run_specs(specs, Store(tmp_path / "store"))
    finally:
        torch.set_num_threads(threads)
    assert not out.failed_jobs, out.failed_jobs
    assert out.computed > 0 and not out.errors


# ----------------------------------------------------------------- the generated matrix

GENERATED = generated()


def _related(named: str, field: str) -> bool:
    """The refusal names the mutated field, a field inside it, its section, or a field of the same section."""
    return named.split(".")[0] == field.split(".")[0] or field.startswith(f"{named}.")


@pytest.mark.parametrize("case_id, base, sets, field", GENERATED, ids=[g[0] for g in GENERATED])
def test_generated_mutation(case_id, base, sets, field, tmp_path):
    path = tmp_path / "case.yaml"
    path.write_text(yaml.safe_dump(mutate(base_raw(base), sets), allow_unicode=True, sort_keys=False))
    t0 = time.perf_counter()
    out = CliRunner().invoke(app, ["validate", str(path)])
    text = out.output.strip()
    assert not (out.exception and not isinstance(out.exception, SystemExit)), f"traceback: {out.exception!r}"
    assert time.perf_counter() - t0 < SECONDS
    assert "\n" not in text and len(text) < 1200, text[:300]
    if out.exit_code == 0:
        assert text.startswith("ok: ")
        return
    assert out.exit_code == 2 and text.startswith("invalid spec "), text[:300]
    named = text.removeprefix("invalid spec ").split(": ", 1)[0]
    assert _related(named, field) or named in CROSS.get(field.split(".")[-1], ()), text[:300]


# A refusal may rightly name another field: a longer batch makes prune.rewind_iter too late, say.
CROSS = {"batch_size": ("prune.rewind_iter", "prune.lr_rewind_iter", "prune.sparsity", "prune.rate",
                        "train.warmup_iterations", "train.milestones"),
         "val_size": ("prune.rewind_iter", "prune.lr_rewind_iter"),
         "dataset": ("model.name",), "name": ("model.name", "model", "data.dataset"),
         "flow": ("flow",), "epochs": ("prune.rewind_iter", "prune.lr_rewind_iter", "train.warmup_iterations"),
         "iterations": ("prune.rewind_iter",), "batch_norm": ("early_bird.structure", "train.bn_l1", "prune.criterion")}


def test_corpus_size():
    assert len(CASES) + len(GENERATED) >= 150 and len(CASES) >= 150


# ----------------------------------------------------------------- direct regressions

def test_an_override_never_leaks_through_an_alias():
    text = yaml.safe_dump({k: v for k, v in tiny_base("prune_after_training").items() if k not in ("train", "retrain")})
    raw = yaml_io.parse(text + "train: &t {optimizer: sgd, lr: 0.05, epochs: 1}\nretrain: *t\n", "spec")
    spec = parse_spec(apply_overrides(raw, ["train.lr=0.5"]))
    assert (spec.train.lr, spec.retrain.lr) == (0.5, 0.05)


def test_limits_are_fast():
    t0 = time.perf_counter()
    with pytest.raises(yaml_io.SpecError, match="more than 10,000 nodes"):
        yaml_io.parse(laughs(), "bomb")
    with pytest.raises(yaml_io.SpecError, match="nested deeper"):
        yaml_io.parse("[" * 60_000 + "]" * 60_000, "deep")
    assert time.perf_counter() - t0 < 2


def test_device_cuda_is_refused_only_without_cuda(monkeypatch):
    raw = tiny_base() | {"device": "cuda"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_spec(raw).device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(yaml_io.SpecError, match="^device: cuda, but torch sees no CUDA device"):
        parse_spec(raw)

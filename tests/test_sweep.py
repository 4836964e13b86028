"""Sweeps: expansion and validation before compute, deduplication by stage key, and a real
3 criteria × 3 sparsities sweep on a 2-worker Dask LocalCluster that initialises and trains
the dense network once, then reports."""
from __future__ import annotations

import os
from collections import Counter

import pytest
import yaml

from conftest import tiny_raw
from pai_core.spec_io import SpecError
from pai_core.store import Store
from pai_core.sweep import SweepSpec, load_sweep, plans_for, unique_nodes

CRITERIA, SPARSITIES = ["snip", "grasp", "magnitude"], [0.5, 0.8, 0.95]


def base_raw() -> dict:
    raw = tiny_raw("prune_at_init", prune={"schedule": "one_shot", "criterion": "snip", "sparsity": 0.5,
                                           "params": {"batches": 2}})
    del raw["prune"]["rate"], raw["prune"]["rounds"]
    return raw | {"name": "tiny_pai"}


def sweep_spec(**dask) -> SweepSpec:
    return SweepSpec.model_validate({"name": "tiny-sweep", "base": [base_raw()],
                                     "grid": {"prune.criterion": CRITERIA, "prune.sparsity": SPARSITIES},
                                     "dask": {"workers": 2, **dask}})


def test_expansion_names_points_and_takes_each_criterions_default_params():
    specs = sweep_spec().expand()
    assert len(specs) == 9
    assert specs[0].name == "tiny_pai[criterion=snip,sparsity=0.5]"
    assert {(s.prune.criterion, s.prune.sparsity) for s in specs} == {(c, p) for c in CRITERIA for p in SPARSITIES}
    assert specs[0].prune.params == {"batches": 2}           # the base's own criterion keeps its params
    assert all(s.prune.params == {} for s in specs if s.prune.criterion != "snip")


def test_a_sanity_checks_base_sweeps_over_its_base_prune_section():
    """A sanity spec holds its base's prune section as a plain dict: the grid still varies it."""
    base = base_raw() | {"flow": "sanity_checks", "name": "tiny_sanity", "sanity": {"base": "prune_at_init"}}
    specs = SweepSpec.model_validate({"name": "s", "base": [base], "grid": {"prune.criterion": ["snip", "magnitude"],
                                                                            "seed": [0, 1]}}).expand()
    assert [(s.prune["criterion"], s.seed) for s in specs] == [("snip", 0), ("snip", 1), ("magnitude", 0),
                                                               ("magnitude", 1)]
    assert [s.prune["params"] for s in specs] == [{"batches": 2}] * 2 + [{}] * 2


def test_a_grid_over_n_and_m_derives_each_points_sparsity():
    """The base's sparsity was derived from its 2:4 when it was resolved; a point that changes n or
    m derives it again, and a point that also sets a sparsity that does not match is refused."""
    base = base_raw()
    base["prune"] = {"schedule": "one_shot", "criterion": "magnitude", "structure": "nm", "n": 2, "m": 4,
                     "nm_indivisible": "dense"}
    specs = SweepSpec.model_validate({"name": "nm", "base": [base], "grid": {"prune.n": [1, 2],
                                                                              "prune.m": [4, 8]}}).expand()
    assert [(s.prune.n, s.prune.m, s.prune.sparsity) for s in specs] == [(1, 4, 0.75), (1, 8, 0.875), (2, 4, 0.5),
                                                                         (2, 8, 0.75)]
    bad = SweepSpec.model_validate({"name": "nm", "base": [base], "grid": {"prune.n": [1], "prune.sparsity": [0.5]}})
    with pytest.raises(SpecError, match=r"prune.sparsity: structure nm keeps 1 of every 4 weights \(sparsity 0.75\)"):
        bad.expand()


def test_bad_grid_point_is_named_before_anything_runs(tmp_path):
    sw = SweepSpec.model_validate({"base": [base_raw()], "grid": {"prune.sparsity": [0.5, 1.5]}})
    with pytest.raises(SpecError, match=r"grid point \{'prune.sparsity': 1.5\}: prune.sparsity"):
        sw.expand()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base_raw()))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": ["base.yaml"], "grid": {"prune.critrion": ["snip"]}}))
    with pytest.raises(SpecError, match="critrion: unknown field; allowed: criterion"):
        load_sweep(tmp_path / "s.yaml")
    (tmp_path / "e.yaml").write_text(yaml.safe_dump({"base": ["base.yaml"], "grid": {"seed": []}}))
    with pytest.raises(SpecError, match="grid.seed: give at least one value"):
        load_sweep(tmp_path / "e.yaml")


def test_dedup_leaves_one_init_and_one_pretrain_for_nine_specs():
    specs = sweep_spec().expand()
    roles = Counter(n.role for n in unique_nodes(plans_for(specs)))
    # score does not depend on the sparsity: one per criterion; the rest once per spec.
    assert roles == {"init": 1, "pretrain": 1, "evaluate": 10, "score": 3, "mask": 9, "sparse_train": 9}
    assert sum(len(p.nodes) for p in plans_for(specs)) == 9 * 7


def test_example_sweep_config_loads():
    specs = load_sweep("configs/sweeps/criteria_lenet300.yaml").expand()
    roles = Counter(n.role for n in unique_nodes(plans_for(specs)))
    assert len(specs) == 18 and roles["pretrain"] == 2 and roles["init"] == 2 and roles["sparse_train"] == 18


@pytest.fixture(scope="module")
def prefect():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.mark.slow
def test_sweep_on_dask_trains_dense_once_and_reports(prefect, pai_home):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.env import tracking_uri
    from flows.sweep import sweep

    state = sweep(sweep=sweep_spec(), return_state=True)
    summary = state.result()
    assert summary["executed"] == {"init": 1, "pretrain": 1, "evaluate": 10, "score": 3, "mask": 9,
                                   "sparse_train": 9}
    store = Store(pai_home / "store")
    assert len(list((store.root / "init").glob("*.json"))) == 1
    assert len(list((store.root / "train").glob("*.json"))) == 1 + 9  # one dense, nine sparse

    # Prefect saw exactly one run of each shared stage, and the trainings ran in Dask worker
    # processes (at least two of them), not in this one.
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        roles = Counter(r.name.split(" · ")[0] for r in runs)
        assert roles["init"] == 1 and roles["pretrain"] == 1 and roles["sparse_train"] == 9
        arts = {a.key for a in client.read_artifacts()}
    assert {"pai-report-tiny-sweep", "pai-report-tiny-sweep-accuracy", "pai-report-tiny-sweep-layers"} <= arts
    pids = {store.get("train", n.key).info.computed_by["pid"]
            for p in plans_for(sweep_spec().expand()) for n in p.nodes if n.role == "sparse_train"}
    assert len(pids) >= 2 and os.getpid() not in pids

    # Report: real PNGs, a table with every method, logged under the sweep's MLflow run.
    rep = summary["report"]
    for png in (rep["accuracy_png"], rep["layers_png"]):
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = open(rep["markdown"]).read()
    assert all(m in table for m in ("| dense |", "| SNIP |", "| GraSP |", "| magnitude |"))
    client = MlflowClient(tracking_uri())
    assert {a.path for a in client.list_artifacts(summary["mlflow_run_id"], "report")} == {
        "report/report.md",
        *(f"report/{plot}.{ext}" for plot in ("accuracy", "layers", "flops") for ext in ("png", "pdf", "svg"))}
    children = client.search_runs([client.get_run(summary["mlflow_run_id"]).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{summary['mlflow_run_id']}'")
    assert len(children) == 9 and all(c.info.status == "FINISHED" for c in children)
    sweep_run = client.get_run(summary["mlflow_run_id"])  # not mistaken for a crashed attempt
    assert sweep_run.info.status == "FINISHED" and "pai.superseded_by" not in sweep_run.data.tags

    again = sweep(sweep=sweep_spec())
    assert again["executed"] == {} and again["reused"] == 33


@pytest.mark.slow
def test_a_failing_point_fails_alone_and_is_reported_missing(prefect, pai_home):
    from flows.sweep import sweep

    # One-shot magnitude at init empties fc1 at 99.95 % (tests/test_collapse_erk.py): that
    # spec fails; the 50 % one is trained, tracked and reported; the run ends Failed, naming it.
    sw = SweepSpec.model_validate({"name": "collapse", "base": [base_raw()],
                                   "grid": {"prune.criterion": ["magnitude"], "prune.sparsity": [0.5, 0.9995]}})
    state = sweep(sweep=sw, sequential=True, return_state=True)
    assert state.is_failed() and "1 of 2 specs failed" in state.message
    summary = state.result(raise_on_failure=False)
    (name, why), = summary["failed"].items()
    assert "sparsity=0.9995" in name and "LayerCollapse" in why
    assert summary["executed"]["sparse_train"] == 1
    table = open(summary["report"]["markdown"]).read()
    assert "| magnitude | 0.5000 |" in table and "Not computed yet (1)" in table


def test_fractional_claims_pack_stages_onto_one_local_gpu_worker():
    """A LocalCluster worker holds one whole unit of each claimed resource, so a stage claiming a
    quarter GPU shares it with three others (as many as the worker's threads)."""
    from flows.runner import local_capacity

    assert local_capacity({"GPU": 0.25}) == {"GPU": 1.0}
    assert local_capacity({"GPU": 1}) == {"GPU": 1.0}
    assert local_capacity({"GPU": 2, "MEM": 0.5}) == {"GPU": 2.0, "MEM": 1.0}
    assert local_capacity({}) is None
    packed = sweep_spec(workers=1, threads_per_worker=4, resources={"GPU": 0.25})
    assert packed.dask.resources == {"GPU": 0.25} and 4 * 0.25 <= local_capacity(packed.dask.resources)["GPU"]

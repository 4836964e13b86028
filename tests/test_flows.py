"""The Prefect flows end to end on synthetic data: caching across runs, sharing across
paradigms, recomputing what was lost, and what lands in MLflow."""
from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_spec
from pai_core.paradigms import build_plan
from pai_core.store import Store

pytestmark = pytest.mark.slow  # each test starts Prefect's temporary server and runs whole flows


@pytest.fixture(scope="module")
def prefect():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def statuses(summary):
    return {(s["round"], s["role"]): (s["status"], s["prefect_state"]) for s in summary["stages"]}


def test_lth_rerun_computes_nothing_and_pat_reuses_the_pretrain(prefect, pai_home):
    from flows.lottery_ticket import lottery_ticket
    from flows.prune_after_training import prune_after_training

    spec = tiny_spec(prune={"reinit_control": True})
    first = lottery_ticket(spec=spec)
    n_nodes = len(build_plan(spec).nodes)
    assert first["computed"] == n_nodes and first["reused"] == 0
    assert [r["sparsity"] for r in first["rounds"]] == pytest.approx([0, 0.2, 0.2, 0.36, 0.36], abs=1e-4)

    second = lottery_ticket(spec=spec)
    assert second["computed"] == 0
    assert {state for _, state in statuses(second).values()} == {"Cached"}
    assert second["rounds"] == first["rounds"]

    pat = prune_after_training(spec=tiny_spec("prune_after_training"))
    st = statuses(pat)
    assert st[("dense", "init")][0] == st[("dense", "pretrain")][0] == "reused"
    assert st[("round 1", "finetune")][0] == "computed"

    # Lose one artifact: exactly that stage runs again (Prefect's stale record is refreshed).
    retrain = build_plan(spec).rounds[1].trained
    Store(pai_home / "store").payload_path("train", retrain.key).unlink()
    third = lottery_ticket(spec=spec)
    assert [(s["role"], s["round"]) for s in third["stages"] if s["status"] == "computed"] == [("retrain", "round 1")]


def test_mlflow_gets_params_metrics_masks_and_weights(prefect, pai_home):
    from flows.lottery_ticket import lottery_ticket
    from flows.env import tracking_uri

    spec = tiny_spec(experiment="tracking-test", tracking={"copy_artifacts": True})
    summary = lottery_ticket(spec=spec)
    client = MlflowClient(tracking_uri())
    assert tracking_uri().startswith("sqlite:///" + str(pai_home))
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.params["prune.rate"] == "0.2" and parent.data.params["model.name"] == "lenet_300_100"
    assert parent.info.status == "FINISHED"
    assert "spec.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    exp = client.get_experiment_by_name("tracking-test")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["dense", "round 1", "round 2"]
    r2 = next(c for c in children if c.info.run_name == "round 2")
    assert r2.data.metrics["sparsity"] == pytest.approx(0.36, abs=1e-4)
    history = client.get_metric_history(r2.info.run_id, "epoch/val_acc")
    assert len(history) == spec.retrain_spec.epochs and all(0 <= m.value <= 1 for m in history)
    assert {"mask.pt", "weights.pt", "sparsity_report.json"} <= {a.path for a in client.list_artifacts(r2.info.run_id)}
    # The store key and sha256 of what the round trained on, so MLflow points at the verified store.
    store = Store(pai_home / "store")
    rnd = build_plan(spec).rounds[2]
    assert r2.data.tags["pai.train_key"] == rnd.trained.key
    assert r2.data.tags["pai.weights_sha256"] == store.get("train", rnd.trained.key).sha256
    assert r2.data.tags["pai.mask_sha256"] == store.get("mask", rnd.mask.key).sha256


def test_mlflow_gets_no_copy_of_weights_by_default(prefect, pai_home):
    from flows.lottery_ticket import lottery_ticket
    from flows.env import tracking_uri

    summary = lottery_ticket(spec=tiny_spec(experiment="no-copy"))
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("no-copy")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    assert len(children) == 3
    for c in children:
        assert {a.path for a in client.list_artifacts(c.info.run_id)} == {"sparsity_report.json"}
        assert len(c.data.tags["pai.weights_sha256"]) == 64


def test_store_outranks_a_stale_prefect_record(prefect, pai_home):
    """An artifact rewritten outside Prefect (a notebook recompute) leaves Prefect's cache
    record pointing at old bytes: the flow must use the store's artifact, not crash on it."""
    from flows.lottery_ticket import lottery_ticket

    spec = tiny_spec()
    lottery_ticket(spec=spec)
    store = Store(pai_home / "store")
    node = build_plan(spec).rounds[0].evaluate
    info = store.get("evaluate", node.key).info.model_copy(update={"test_acc": 0.123})
    store.put("evaluate", node.key, {}, info)
    again = lottery_ticket(spec=spec)
    assert again["computed"] == 0 and again["rounds"][0]["test_acc"] == 0.123


def test_prune_at_init_flow_reuses_the_lth_init_and_dense_round(prefect, pai_home):
    from flows.lottery_ticket import lottery_ticket
    from flows.prune_at_init import prune_at_init

    lottery_ticket(spec=tiny_spec())
    out = prune_at_init(spec=tiny_spec("prune_at_init", prune={"criterion": "snip", "schedule": "one_shot",
                                                                "sparsity": 0.9, "rate": None, "rounds": 1}))
    st = statuses(out)
    assert st[("dense", "init")][0] == st[("dense", "pretrain")][0] == "reused"
    assert st[("snip", "sparse_train")][0] == "computed"
    assert out["rounds"][1]["sparsity"] == pytest.approx(0.9, abs=1e-4)


class _Touch:
    """Unpickling this creates a file: what a crafted cache record would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


def test_a_crafted_pickle_cache_record_is_never_read(prefect, pai_home, tmp_path):
    """Issue 12 #9: Prefect deserializes a record with the serializer the record names, so a
    record rewritten to name pickle used to run code. Records are pai-ref JSON and are checked
    before Prefect reads them; a bad one is removed and the stage comes from the verified store."""
    import json

    from prefect.serializers import PickleSerializer

    from flows.lottery_ticket import lottery_ticket

    spec = tiny_spec()
    lottery_ticket(spec=spec)
    from tasks.cache import records_root

    records = records_root()
    init = build_plan(spec).rounds[0].trained.inputs["start"]
    path = records / f"pai-init-{init.key}"
    record = json.loads(path.read_text())
    assert record["metadata"]["serializer"]["type"] == "pai-ref"  # JSON, not a pickle
    marker = tmp_path / "pwned"
    record["metadata"]["serializer"] = PickleSerializer().model_dump(mode="json")
    record["result"] = PickleSerializer().dumps(_Touch(str(marker))).decode()
    path.write_text(json.dumps(record))
    again = lottery_ticket(spec=spec)
    assert not marker.exists(), "the crafted record was unpickled"
    assert again["computed"] == 0, "the stage still came from the verified store"


def test_a_flow_run_publishes_its_results_trains_live_and_a_rerun_logs_no_new_rounds(prefect, pai_home):
    """Issue 13: results as Prefect artifacts, summary metrics on the MLflow parent, each round's
    run opened by its training and fed epoch by epoch, cache provenance on reused tasks, and a
    fully cached re-run that links the finished rounds instead of logging them again."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId)

    from flows.env import tracking_uri
    from flows.lottery_ticket import lottery_ticket
    from flows.paradigm_flows import OVERRIDES

    spec = tiny_spec(name="live", experiment="ui-test", prune={"rate": 0.3})
    token = OVERRIDES.set(["prune.rate=0.3"])
    try:
        first = lottery_ticket(spec=spec, return_state=True)
        second = lottery_ticket(spec=spec, return_state=True)
    finally:
        OVERRIDES.reset(token)
    n = len(build_plan(spec).nodes)
    assert first.message == f"{n} stages computed, 0 reused" and second.message == f"0 stages computed, {n} reused"
    one, two = first.result(), second.result()

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("ui-test")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens as a runs table, not GenAI
    parent = client.get_run(one["mlflow_run_id"])
    assert parent.info.run_name == "live [prune.rate=0.3]"
    assert parent.data.metrics["final_test_acc"] == pytest.approx(one["rounds"][-1]["test_acc"])
    assert parent.data.metrics["best_test_acc"] == pytest.approx(max(r["test_acc"] for r in one["rounds"]))
    assert parent.data.metrics["final_sparsity"] == pytest.approx(0.51, abs=1e-4)
    steps = [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "round/test_acc")]
    assert steps == [(i, r["test_acc"]) for i, r in enumerate(one["rounds"])]

    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["dense", "round 1", "round 2"]
    for c in children:
        assert c.data.tags["pai.live_for"] == c.data.tags["pai.train_key"]  # opened by the training itself
        epochs = client.get_metric_history(c.info.run_id, "epoch/val_acc")
        assert len(epochs) == (spec.train if c.info.run_name == "dense" else spec.retrain_spec).epochs  # no duplicates
        assert c.data.metrics["layer_density/fc1.weight"] > 0
    r2 = next(c for c in children if c.info.run_name == "round 2")
    assert r2.data.params["density_target"] == "0.49"  # not 0.48999999999999994
    assert r2.data.metrics["layer_density/total"] == pytest.approx(0.49, abs=1e-3)

    # The fully cached re-run: a light parent linking the finished rounds, no second set of rounds.
    again = client.get_run(two["mlflow_run_id"])
    assert again.data.tags["pai.all_reused"] == "true"
    assert not client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{again.info.run_id}'")
    assert {again.data.tags[f"pai.round.{i}.run_id"] for i in range(3)} == {c.info.run_id for c in children}
    assert again.data.metrics["final_test_acc"] == parent.data.metrics["final_test_acc"]

    with get_client(sync_client=True) as prefect_client:
        def artifacts(flow_run_id):
            return prefect_client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

        made = artifacts(first.state_details.flow_run_id)
        keyed = {a.key: a for a in made if a.key}
        assert {"pai-live-results", "pai-live-stages", "pai-live-accuracy"} <= set(keyed)
        table = json.loads(keyed["pai-live-results"].data)
        assert [row["round"] for row in table] == ["dense", "round 1", "round 2"]
        assert {row["status"] for row in table} == {"computed"}
        assert f"**{n} computed, 0 reused**" in keyed["pai-live-stages"].data
        assert keyed["pai-live-accuracy"].data.startswith("data:image/png;base64,")
        progress = [a for a in made if a.type == "progress"]
        assert len(progress) == 3 and all(a.data == 100 for a in progress)  # one per training stage

        run2 = prefect_client.read_flow_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[second.state_details.flow_run_id])))[0]
        tasks = prefect_client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run2.id])))
        retrain = next(t for t in tasks if t.name == "retrain · round 2 (reused)")
        assert retrain.state.name == "Cached"
        assert retrain.task_inputs["wait_for"], "a cached task keeps its edges in the graph"
        notes = [a for a in artifacts(run2.id) if a.task_run_id == retrain.id]
        run1 = prefect_client.read_flow_run(first.state_details.flow_run_id)
        (note,) = notes
        assert retrain_key(spec) in note.data and run1.name in note.data


def retrain_key(spec):
    return build_plan(spec).rounds[2].trained.key

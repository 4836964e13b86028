"""`pai export` / pai_core.export: each format computes what the masked model computes, loads
without pai-flow, and every combination it cannot export faithfully is refused by name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import reduce
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from typer.testing import CliRunner

from conftest import tiny_raw, tiny_spec
from flows.cli import app
from pai_core import export as ex
from pai_core import semi_structured
from pai_core.export import (FORMATS, ExportRefused, RoundNotStored, build, check_device, check_supported,
                             load_exported, save_module, two_four_problem)
from pai_core.sparse_layers import SemiStructuredLinear
from pai_core.speedup import graph_replay
from pai_core.export_round import export_round, load_masked_model
from pai_core.masks import dense_mask
from pai_core.models import build_model
from pai_core.paradigms import build_plan
from pai_core.stages import Runtime, run_plan
from pai_core.store import Store

MODELS = {"lenet_300_100": {"name": "lenet_300_100"}, "conv2": {"name": "conv2", "width": 0.125}}
FP32 = ["dense", "csr", "bsr", "structured"]
runner = CliRunner()


def lth(model: dict, **over):
    """One round of magnitude pruning (50 % of weights, unstructured)."""
    return tiny_spec(model=model, train={"epochs": 1}, prune={"rounds": 1, "rate": 0.5}, **over)


def pat_filters(model: dict):
    """Half of every layer's filters/neurons removed, with their dependent channels."""
    return tiny_spec("prune_after_training", model=model, train={"epochs": 1}, retrain={"epochs": 1},
                     prune={"structure": "filter", "scope": "layerwise", "rounds": 1, "rate": 0.5})


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Both models trained and pruned once, unstructured and by filters, in one store."""
    store = Store(tmp_path_factory.mktemp("export") / "store")
    specs = {}
    for name, model in MODELS.items():
        specs[name] = {"unstructured": lth(model), "filter": pat_filters(model)}
        for spec in specs[name].values():
            run_plan(build_plan(spec).nodes, Runtime(store, "cpu"))
    return store, specs


def spec_for(specs, model: str, fmt: str):
    return specs[model]["filter" if fmt == "structured" else "unstructured"]


def close(y: torch.Tensor, ref: torch.Tensor, fmt: str) -> bool:
    f = FORMATS[fmt]
    return bool(torch.allclose(y.float(), ref.float(), atol=f.atol, rtol=f.rtol))


# ------------------------------------------------------------------ every format


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("fmt", FP32)
def test_each_format_reproduces_the_masked_model(stored, tmp_path, model, fmt):
    store, specs = stored
    spec = spec_for(specs, model, fmt)
    m = export_round(spec, None, fmt, tmp_path, block_size=2 if fmt == "bsr" else None, store=store)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["manifest.json", "reference.pt", m.file])
    assert m.check.passed and m.check.inputs == "synthetic test[:64]" and m.check.batch == 64
    assert (m.check.atol, m.check.rtol) == (1e-4, 1e-4)
    assert m.sparsity == pytest.approx(0.5, abs=0.02 if fmt != "structured" else 0.3)

    # Loaded as a user would, on a batch of another size, against the masked model built by pai_core.
    r = load_masked_model(spec, None, store)
    assert r.model.fc1.weight[~r.mask["fc1.weight"]].abs().sum() == 0  # the reference is masked
    x = torch.randn(5, *r.arch.in_shape, generator=torch.Generator().manual_seed(1))
    loaded = load_exported(tmp_path / m.file)
    with torch.no_grad():
        y, ref = loaded(x), r.model(x)
    assert close(y, ref, fmt), float((y - ref).abs().max())

    kinds = {name: (layer.kind, layer.stored_as) for name, layer in m.layers.items()}
    if fmt == "csr":
        assert all(s == "sparse" for _, s in kinds.values())  # convs too, as im2col matmuls
    elif fmt == "bsr":  # Linear sparse; convs dense by default, and said so per layer
        assert all(s == ("sparse" if k == "linear" else "dense") for k, s in kinds.values())
        assert all("keeps convs dense" in layer.why_dense for layer in m.layers.values() if layer.kind == "conv")
    else:
        assert all(s == "dense" for _, s in kinds.values())
    if fmt == "structured":  # physically smaller
        assert sum(p.numel() for p in loaded.parameters()) < 0.75 * sum(p.numel() for p in r.model.parameters())


def test_bsr_convs_as_blocks_when_asked(stored, tmp_path):
    store, specs = stored
    m = export_round(specs["conv2"]["unstructured"], None, "bsr", tmp_path, block_size=1, sparse_conv=True,
                     store=store)
    assert all(layer.stored_as == "sparse" for layer in m.layers.values()) and m.sparse_conv
    assert m.check.passed


def test_exports_load_in_a_fresh_process_without_pai_flow(stored, tmp_path):
    store, specs = stored
    dirs = []
    for fmt in FP32:
        d = tmp_path / fmt
        export_round(spec_for(specs, "conv2", fmt), None, fmt, d, block_size=2 if fmt == "bsr" else None,
                     store=store)
        dirs.append(str(d))
    site = str(Path(torch.__file__).resolve().parents[1])
    script = tmp_path / "run" / "load.py"
    script.parent.mkdir()
    script.write_text(f"""
import json, sys
sys.path.append({site!r})  # torch's site-packages only: -S skipped site, so no .pth (no editable pai-flow)
for name in ("pai_core", "flows"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(name + " is importable")
import torch
out = {{}}
for d in {dirs!r}:
    man = json.load(open(d + "/manifest.json"))
    path = d + "/" + man["file"]
    model = torch.export.load(path).module() if man["serialization"] == "torch.export" else torch.jit.load(path)
    ref = torch.load(d + "/reference.pt")
    with torch.no_grad():
        y = model(ref["inputs"])
    out[man["format"]] = {{"max_abs_diff": float((y - ref["outputs"]).abs().max()),
                          "ok": torch.allclose(y, ref["outputs"], atol=man["check"]["atol"], rtol=man["check"]["rtol"]),
                          "serialization": man["serialization"]}}
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("pai_core", "flows"))
print(json.dumps(out))
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run([sys.executable, "-I", "-S", str(script)], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out.pop("modules") == []
    assert {fmt: (r["ok"], r["serialization"]) for fmt, r in out.items()} == {
        "dense": (True, "torch.export"), "csr": (True, "torchscript"), "bsr": (True, "torchscript"),
        "structured": (True, "torch.export")}


@pytest.mark.parametrize("model", MODELS)
def test_csr_weights_are_sparse_tensors_holding_exactly_the_kept_weights(stored, tmp_path, model):
    store, specs = stored
    r = load_masked_model(specs[model]["unstructured"], None, store)
    first_conv_or_fc = next(n for n, m in r.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    kept = r.mask[f"{first_conv_or_fc}.weight"]
    with torch.no_grad():  # a kept weight that is exactly 0 is still a kept weight: the mask decides
        r.model.get_submodule(first_conv_or_fc).weight[kept.nonzero()[0].tolist()] = 0.0
    x = torch.randn(8, *r.arch.in_shape)
    module = build("csr", r.model, r.mask, x)  # checks outputs against the masked model too
    path = save_module(module, "csr", tmp_path / "m.jit.pt", x)
    loaded = load_exported(path)
    for name, layer in r.model.named_modules():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        keep = r.mask[f"{name}.weight"]
        saved = reduce(getattr, name.split("."), loaded).matrix.weight  # ScriptModules lack get_submodule
        for w in (module.get_submodule(name).matrix(), saved):
            assert w.layout == torch.sparse_csr
            assert w._nnz() == int(keep.sum())
            assert torch.equal(w.to_dense(), (layer.weight * keep).reshape(layer.weight.shape[0], -1))


def test_bsr_weights_are_blocks(stored):
    store, specs = stored
    r = load_masked_model(specs["lenet_300_100"]["unstructured"], None, store)
    module = build("bsr", r.model, r.mask, block_size=2)
    w = module.fc2.matrix()
    keep = r.mask["fc2.weight"]
    blocks = keep.reshape(50, 2, 150, 2).any(3).any(1)
    assert w.layout == torch.sparse_bsr and w.values().shape == (int(blocks.sum()), 2, 2)
    assert torch.equal(w.to_dense(), r.model.fc2.weight * keep)


# ----------------------------------------------------------------------- refusals


def test_unknown_format_is_refused_with_the_allowed_ones(stored, tmp_path):
    store, specs = stored
    with pytest.raises(ExportRefused, match="unknown format 'coo'; allowed: dense, csr, bsr, semi_structured, "
                                            "structured$"):
        export_round(specs["lenet_300_100"]["unstructured"], None, "coo", tmp_path / "out", store=store)
    assert not (tmp_path / "out").exists()


def test_semi_structured_needs_a_recent_cuda_device(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    need = r"semi_structured needs a CUDA device with compute capability >= 8\.0"
    with pytest.raises(ExportRefused, match=need + "; torch sees no CUDA device"):
        check_device("semi_structured", "cuda")
    # refused before anything is read: this spec was never run, yet the device is what is named
    with pytest.raises(ExportRefused, match=need):
        export_round(lth(MODELS["lenet_300_100"], seed=5), None, "semi_structured", tmp_path, device="cuda",
                     store=Store(tmp_path / "store"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ExportRefused, match=need + "; the export device is cpu"):
        check_device("semi_structured", "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    with pytest.raises(ExportRefused, match=need + r"; cuda \(Tesla T4\) is 7\.5"):
        check_device("semi_structured", "cuda")
    check_device("csr", "cpu")  # other formats: any device


def two_four(shape: tuple[int, ...]) -> torch.Tensor:
    """Keep the first 2 of every 4 consecutive weights of each row."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    return (torch.arange(cols) % 4 < 2).expand(rows, cols).reshape(shape).clone()


def test_two_four_check():
    assert two_four_problem({"w": two_four((3, 8))}, ["w"]) is None
    assert two_four_problem({"w": two_four((4, 2, 3, 3))}, ["w"]) is None  # conv: reshape(out, -1)
    m = two_four((3, 8))
    m[1, 6] = True  # row 1, weights 4..7 keep 3 (4, 5, 6)
    assert two_four_problem({"ok": two_four((2, 4)), "w": m}, ["ok", "w"]) == \
        "w is not 2:4 along rows: row 1, weights 4..7 keep 3 (at most 2 of every 4 consecutive)"
    tail = torch.zeros(2, 7, dtype=torch.bool)
    tail[1, 4:6] = True  # a last, shorter group may keep 2...
    assert two_four_problem({"w": tail}, ["w"]) is None
    tail[1, 6] = True  # ...but not 3
    assert "row 1, weights 4..6 keep 3" in two_four_problem({"w": tail}, ["w"])
    assert two_four_problem({"w": torch.ones(2, 4, dtype=torch.bool)}, ["w"]).startswith("w is not 2:4")


def test_semi_structured_refuses_a_mask_that_is_not_2_4_naming_the_layer(monkeypatch):
    model = build_model("lenet_300_100", (1, 16, 16), 10, seed=0)
    mask = {n: two_four(m.shape) for n, m in dense_mask(model).items()}
    mask["fc2.weight"][7, 0:3] = True
    with pytest.raises(ExportRefused, match=r"^semi_structured needs a 2:4 mask: fc2.weight is not 2:4 along rows: "
                                            r"row 7, weights 0..3 keep 3"):
        check_supported("semi_structured", model, mask, device="cuda")
    mask["fc2.weight"][7, 2] = False  # 2:4 everywhere now: what is left to refuse here is the device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ExportRefused, match="torch sees no CUDA device"):
        check_supported("semi_structured", model, mask, device="cuda")


def test_semi_structured_keeps_a_layer_the_mask_leaves_whole_dense_and_refuses_a_mask_with_no_2_4_layer(monkeypatch):
    model = build_model("lenet_300_100", (1, 16, 16), 10, seed=0)
    mask = {n: two_four(m.shape) for n, m in dense_mask(model).items() if n != "fc3.weight"}  # the head left out
    mask_whole_head = {**mask, "fc3.weight": torch.ones(10, 100, dtype=torch.bool)}
    for m in (mask, mask_whole_head):
        plan = {p.name: (p.stored_as, p.why_dense) for p in ex.layer_plan("semi_structured", model, mask=m)}
        assert plan == {"fc1": ("sparse", ""), "fc2": ("sparse", ""), "fc3": ("dense", "the mask keeps every weight")}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(ExportRefused, match="torch sees no CUDA device"):  # the mask passed; the device did not
            check_supported("semi_structured", model, m, device="cuda")
    whole = {n: torch.ones_like(m) for n, m in dense_mask(model).items()}
    with pytest.raises(ExportRefused, match=r"^semi_structured: the mask keeps every Linear weight, so no layer is "
                                            r"2:4 \(export a round with an N:M mask: prune.structure nm\)"):
        check_supported("semi_structured", model, whole, device="cuda")


def test_semi_structured_linear_pads_and_slices_right(monkeypatch, tmp_path):
    """The layer's own arithmetic (padding, transposes, slicing, bias, the algorithm per call) with
    a stand-in for the cuSPARSELt kernel, which needs a GPU: `packed` is the padded dense weight,
    the kernel A @ B."""
    torch.manual_seed(0)
    lin = nn.Linear(10, 7)
    padded = torch.zeros(16, 16)
    padded[:7, :10] = lin.weight.detach()
    layer = SemiStructuredLinear(padded, lin.bias.detach().clone(), 10, 7, 16, row_multiple=8, alg_ids={16: 3})
    calls = []

    def kernel(packed, dense, bias=None, alg_id=0):
        calls.append((alg_id, dense.is_contiguous(), dense.data_ptr()))
        return packed @ dense + (0 if bias is None else bias[:, None])

    with monkeypatch.context() as m:
        m.setattr(torch, "_cslt_sparse_mm", kernel)
        for shape in [(1, 10), (5, 10), (8, 10), (64, 10), (2, 3, 10)]:
            x = torch.randn(shape)
            assert torch.allclose(layer(x), lin(x), atol=1e-6), shape
        # the tuned id for 8 padded rows of a transposed row-major input (1..8 rows, 2x3 too), else the default
        assert [c[0] for c in calls] == [3, 3, 3, 0, 3] and not any(c[1] for c in calls)
        # a layer after a 2:4 layer gets its transposed view: read as a contiguous operand, not copied
        first = SemiStructuredLinear(torch.randn(16, 16), None, 16, 16, 16, row_multiple=8)
        second = SemiStructuredLinear(torch.randn(16, 16), None, 16, 16, 16, row_multiple=8, alg_ids={17: 4})
        x = torch.randn(8, 16)
        h = first(x)
        assert not h.is_contiguous() and h.t().is_contiguous()
        calls.clear()
        assert torch.allclose(second(h), h @ second.packed.t(), atol=1e-5)
        assert calls == [(4, True, h.data_ptr())]
    assert layer.alg_key(8, False) == 16 and layer.alg_key(8, True) == 17
    # The TorchScript archive builds, saves and loads here, the ids with it; running it needs CUDA.
    layer.tuned_on = "H200, cuSPARSELt 800"
    path = save_module(ex.HalfPrecision(layer.half()), "semi_structured", tmp_path / "m.jit.pt", torch.randn(2, 10))
    loaded = load_exported(path)
    assert "torch._cslt_sparse_mm(" in loaded.net.code and "alg_ids" in loaded.net.code
    assert dict(loaded.net.alg_ids) == {16: 3} and loaded.net.tuned_on == "H200, cuSPARSELt 800"


def test_semi_structured_tuning_searches_each_padded_shape_and_layout_and_stays_with_its_gpu(monkeypatch, tmp_path):
    """`tune` stores cuSPARSELt's searched algorithm per padded row count and operand layout, with
    the GPU it was found on; an archive loaded on another GPU drops the ids (they may not exist
    there) and says so."""
    layer = SemiStructuredLinear(torch.zeros(16, 16).half(), None, 10, 7, 16, row_multiple=8)
    twin = SemiStructuredLinear(torch.ones(16, 16).half(), None, 10, 7, 16, row_multiple=8)  # same shape
    net = nn.Sequential(nn.Flatten(), layer, twin)
    searched = []

    def search(packed, operand):
        searched.append((tuple(operand.shape), operand.is_contiguous()))
        return operand.shape[1] // 8 + 100 * operand.is_contiguous()  # an id that names the call
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", search)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "GPU A")
    ids = {16: 1, 17: 101, 80: 5, 81: 105, 128: 8, 129: 108}
    assert semi_structured.tune(net, [1, 37, 40, 64]) == {"1": ids, "2": ids}
    # (padded in, padded rows), both layouts: once per padded shape, shared by the layers of one shape
    assert searched == [((16, r), c) for r in (8, 40, 64) for c in (False, True)]
    assert layer.tuned_on.startswith("GPU A, cuSPARSELt ")
    path = save_module(ex.HalfPrecision(net.half()), "semi_structured", tmp_path / "m.jit.pt", torch.randn(2, 10))
    loaded = load_exported(path, "cpu")
    assert dict(getattr(loaded.net, "1").alg_ids) == dict(layer.alg_ids)  # on no GPU: nothing to drop
    assert semi_structured.retarget(loaded, layer.tuned_on) == 0  # the same GPU: kept
    with pytest.warns(UserWarning, match="2 2:4 layers were tuned on another GPU"):
        assert semi_structured.retarget(loaded, "GPU B, cuSPARSELt 800") == 2
    assert dict(getattr(loaded.net, "1").alg_ids) == {}


@pytest.mark.parametrize("fuse_bias", [False, True])
def test_a_tuned_mlp_runs_every_2_4_call_with_its_searched_algorithm(monkeypatch, fuse_bias):
    """The exported-MLP chain (2:4, bias, ReLU, 2:4, bias, ReLU, dense head): what `tune` searched
    is what forward asks for, layer by layer, at every tuned batch size, so no call falls back to
    algorithm 0 (ids searched for one operand layout and looked up for the other were one
    suspect for the first H200 MLP being slower than dense while each layer alone was faster).
    With `fuse_bias` the kernel gets the bias (padded to its rows) and no add follows."""
    torch.manual_seed(0)
    weights = [torch.randn(16, 16), torch.randn(16, 16)]
    layers = [SemiStructuredLinear(w, torch.randn(13), 13 if i else 16, 13, 16, row_multiple=8, fuse_bias=fuse_bias)
              for i, w in enumerate(weights)]  # 13 outputs: rows and bias padded to the weight's 16
    weights = [w[:13, : 13 if i else 16] for i, w in enumerate(weights)]
    head = nn.Linear(13, 3)
    net = nn.Sequential(nn.Flatten(), layers[0], nn.ReLU(), layers[1], nn.ReLU(), head)
    searched: dict[tuple, int] = {}

    def search(packed, operand):
        key = (tuple(operand.shape), operand.is_contiguous())
        searched[key] = 1 + len(searched)  # a distinct non-zero id per searched call
        return searched[key]
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", search)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "GPU A")
    batches = [1, 13, 64]
    semi_structured.tune(net, batches)
    used = []

    def kernel(packed, dense, bias=None, alg_id=0):
        used.append((alg_id, searched.get((tuple(dense.shape), dense.is_contiguous()))))
        fused.append(bias is not None and bias.shape == (16,))
        return packed @ dense + (0 if bias is None else bias[:, None])
    fused = []
    monkeypatch.setattr(torch, "_cslt_sparse_mm", kernel)
    for batch in batches:
        x = torch.randn(batch, 1, 4, 4)
        h = x.flatten(1)
        for layer, w in zip(layers, weights):
            h = torch.relu(h @ w.t() + layer.bias[:13])
        assert torch.allclose(net(x), head(h), atol=1e-5)
    assert len(used) == 2 * len(batches) and all(alg == expected and alg for alg, expected in used), used
    assert fused == [fuse_bias] * len(used)
    used.clear()
    net(torch.randn(100, 1, 4, 4))  # an untuned batch: the default algorithm, which every shape has
    assert [alg for alg, _ in used] == [0, 0]


def _sm80() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.skipif(not _sm80(), reason="semi_structured runs on CUDA compute capability >= 8.0 only")
def test_semi_structured_on_a_gpu(tmp_path):
    model = build_model("lenet_300_100", (1, 16, 16), 10, seed=0)
    mask = {n: two_four(m.shape) for n, m in dense_mask(model).items()}
    x = torch.randn(37, 1, 16, 16)  # a batch that is no multiple of 8
    module = build("semi_structured", model, mask, x, device="cuda")  # checked against the fp32 masked model
    assert all(isinstance(module.net.get_submodule(n), SemiStructuredLinear) for n in ("fc1", "fc2", "fc3"))
    assert all(module.net.get_submodule(n).alg_ids.keys() == {80, 81} for n in ("fc1", "fc2", "fc3"))  # 37 rows
    path = save_module(module, "semi_structured", tmp_path / "m.jit.pt", x.cuda())
    reference = ex.masked_copy(model, mask).cuda()(x.cuda())
    loaded = load_exported(path, "cuda")
    assert ex.check_outputs(loaded, reference, x.cuda(), "semi_structured").passed
    assert dict(loaded.net.fc1.alg_ids) == dict(module.net.fc1.alg_ids)
    with torch.inference_mode():  # replayed from a CUDA graph, as `pai speedup --cuda-graph` times it
        replay = graph_replay(loaded, x.cuda())
        assert ex.check_outputs(lambda _: replay(), reference, x.cuda(), "semi_structured").passed
    assert all(getattr(loaded.net, n).fuse_bias for n in ("fc1", "fc2", "fc3"))  # the bias in the kernel: default
    apart = build("semi_structured", model, mask, x, device="cuda", fuse_bias=False)  # `pai export --separate-bias`
    loaded = load_exported(save_module(apart, "semi_structured", tmp_path / "f.jit.pt", x.cuda()), "cuda")
    assert not any(getattr(loaded.net, n).fuse_bias for n in ("fc1", "fc2", "fc3"))
    assert ex.check_outputs(loaded, reference, x.cuda(), "semi_structured").passed
    del mask["fc3.weight"]  # the head left out of pruning stays a dense float16 Linear
    module = build("semi_structured", model, mask, x, device="cuda")
    assert isinstance(module.net.fc3, nn.Linear) and module.net.fc3.weight.dtype == torch.float16


def test_structured_refuses_masks_that_are_not_whole_filters(stored, tmp_path):
    store, specs = stored
    with pytest.raises(ExportRefused, match=r"^structured: fc1.weight prunes \d+ single weights inside kept "
                                            r"filters/neurons: structured needs a mask that removes whole"):
        export_round(specs["lenet_300_100"]["unstructured"], None, "structured", tmp_path, store=store)
    resnet = build_model("resnet20", (3, 8, 8), 10, seed=0, width=0.25)
    check_supported("structured", resnet, dense_mask(resnet))  # residual nets have channel groups now
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    with pytest.raises(ExportRefused, match=r"^structured: its channel groups are unknown: .*grouped convolution "
                                            r"\(groups=2\); supported: groups=1 or depthwise"):
        check_supported("structured", grouped, dense_mask(grouped))
    assert not list(tmp_path.iterdir())


def test_block_size_is_refused_unless_it_divides_every_sparse_matrix(stored, tmp_path):
    store, specs = stored
    mlp, conv = specs["lenet_300_100"]["unstructured"], specs["conv2"]["unstructured"]
    with pytest.raises(ExportRefused, match="^bsr block size 3 does not divide layer fc1's 300x256 weight matrix"):
        export_round(mlp, None, "bsr", tmp_path, block_size=3, store=store)
    with pytest.raises(ExportRefused, match="features.conv1's 8x9 weight matrix; .*--dense-conv"):
        export_round(conv, None, "bsr", tmp_path, block_size=2, sparse_conv=True, store=store)
    with pytest.raises(ExportRefused, match="^bsr needs a block size"):
        export_round(mlp, None, "bsr", tmp_path, store=store)
    with pytest.raises(ExportRefused, match="^a block size applies to bsr only, not csr"):
        export_round(mlp, None, "csr", tmp_path, block_size=2, store=store)
    assert not list(tmp_path.iterdir())


def test_a_round_not_stored_is_refused(stored, tmp_path):
    store, specs = stored
    with pytest.raises(RoundNotStored, match=r"^round 'round 1' of tiny is not stored yet \(weights: train "
                                             r"[0-9a-f]{12}\); run it first with `pai run`$"):
        export_round(lth(MODELS["lenet_300_100"], seed=3), None, "dense", tmp_path, store=store)
    with pytest.raises(ExportRefused, match=r"no round 'round 7' in this plan; rounds: 0 'dense', 1 'round 1'"):
        export_round(specs["lenet_300_100"]["unstructured"], "round 7", "dense", tmp_path, store=store)
    m = export_round(specs["lenet_300_100"]["unstructured"], "0", "dense", tmp_path, store=store)
    assert m.round == {"index": 0, "name": "dense"} and m.sparsity == 0 and m.stage_keys["mask"] is None


def test_an_export_past_the_tolerance_is_refused_and_not_kept(stored, tmp_path, monkeypatch):
    store, specs = stored
    real = ex._to_format

    class Off(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x) + 1e-3

    monkeypatch.setattr(ex, "_to_format", lambda *a: Off(real(*a)))
    with pytest.raises(ExportRefused, match=r"^dense export does not reproduce the masked model: max \|Δ\| 0\.001 "
                                            r"\(tolerance atol 0\.0001 \+ rtol 0\.0001·\|y\|\) on synthetic test"):
        export_round(specs["lenet_300_100"]["unstructured"], None, "dense", tmp_path, store=store)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- CLI


def test_cli_export_writes_the_file_and_manifest(tmp_path, pai_home):
    raw = tiny_raw(train={"epochs": 1}, prune={"rounds": 1, "rate": 0.5})
    path, out = tmp_path / "tiny.yaml", tmp_path / "export"
    path.write_text(yaml.safe_dump(raw))
    args = ["export", str(path), "train.epochs=1", "--format", "csr", "-o", str(out)]
    missing = runner.invoke(app, args, terminal_width=200)
    assert missing.exit_code == 2, missing.output
    assert "not stored yet" in missing.output and f"`pai run {path} train.epochs=1`" in missing.output

    spec = tiny_spec(train={"epochs": 1}, prune={"rounds": 1, "rate": 0.5})
    plan = build_plan(spec)
    run_plan(plan.nodes, Runtime(Store(pai_home / "store"), "cpu"))
    ok = runner.invoke(app, [*args, "--round", "round 1"], terminal_width=200)
    assert ok.exit_code == 0, ok.output
    assert (out / "model.jit.pt").is_file() and "max |Δ|" in ok.output
    man = json.loads((out / "manifest.json").read_text())
    rnd = plan.rounds[1]
    assert man["format"] == "csr" and man["serialization"] == "torchscript" and man["block_size"] is None
    assert man["fuse_bias"] is None  # semi_structured only
    assert man["spec"] == spec.model_dump(mode="json") and man["round"] == {"index": 1, "name": "round 1"}
    assert {k: v["key"] for k, v in man["stage_keys"].items()} == {
        "weights": rnd.trained.key, "mask": rnd.mask.key, "evaluate": rnd.evaluate.key}
    assert man["input_shape"] == [1, 16, 16] and man["torch_version"] == torch.__version__
    assert man["check"]["passed"] and man["check"]["max_abs_diff"] <= 1e-4
    fc1 = man["layers"]["fc1"]
    assert fc1["stored_as"] == "sparse" and fc1["stored_values"] == fc1["kept"]
    assert fc1["density"] + fc1["sparsity"] == pytest.approx(1) and man["sparsity"] == pytest.approx(0.5, abs=1e-3)

    for bad, says in ((["--format", "bsr", "--block-size", "3"], "does not divide layer fc1"),
                      (["--format", "coo"], "allowed: dense, csr, bsr, semi_structured, structured"),
                      (["--format", "structured"], "structured: fc1.weight prunes"),
                      (["--format", "csr", "--tune-batch", "64"], "tuning batch sizes apply to semi_structured only"),
                      (["--format", "semi_structured", "--tune-batch", "0"], "a tuning batch size must be >= 1 (got 0)"),
                      (["--format", "csr", "--fuse-bias"], "(--fuse-bias/--separate-bias) applies to semi_structured "
                                                          "only, not csr"),
                      (["--format", "dense", "--separate-bias"], "applies to semi_structured only, not dense")):
        res = runner.invoke(app, ["export", str(path), "train.epochs=1", *bad, "-o", str(tmp_path / "x")],
                            terminal_width=200)
        assert res.exit_code == 2 and "cannot export:" in res.output and says in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1

    # --tune-batch reaches export_round (the tuning itself needs a GPU: test_semi_structured_on_a_gpu)
    seen = {}

    def fake_export(*a, **kw):
        seen.update(kw)
        raise ExportRefused("stopped here")
    import pai_core.export_round as er
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(er, "export_round", fake_export)
        res = runner.invoke(app, ["export", str(path), "--format", "semi_structured", "-o", str(out),
                                  "--tune-batch", "64", "--tune-batch", "1024", "--separate-bias"], terminal_width=200)
    assert res.exit_code == 2 and "stopped here" in res.output and seen["tune_batches"] == [64, 1024]
    assert seen["fuse_bias"] is False

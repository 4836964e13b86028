"""Are the sparse models faster? Every export format against the dense torch model, side by side.

Cases (the issue's goals):
- LeNet-300-100 at 98 % sparsity (global magnitude at init), MNIST-shaped inputs;
- a wide MLP, 4096 → 4096 → 4096 → 4096 → 10, every layer at 98 % (random, layer-wise), batch 1
  is the goal; also the same MLP with a 32×32 block mask for `bsr`;
- LeNet-5 with half of each layer's filters removed (l1), `structured` vs dense, beside the
  FLOP ratio of the two nets; the same for ResNet-56 (option A) on CIFAR-shaped inputs, half of
  every channel group (residual stream included) or of the blocks' inner channels only
  (batches up to 64); and MobileNetV2 at 64×64, half of every channel group (each expansion
  channel with its depthwise filter);
- 2:4 on a 4096 × 4096 (×3) MLP and on one 8192 × 8192 Linear in float16 on a CUDA GPU with
  compute capability >= 8.0 when there is one (`semi_structured` vs the same net dense in float16,
  both called eagerly and both replayed from CUDA graphs, each layer's bias added after the
  product or fused into the kernel); skipped, and said so, when not.

Each format is built, saved, loaded back from its file and its outputs checked against the
masked model before it is timed (pai_core.speedup). Times are medians per call after warm-up,
under torch.inference_mode, with the thread count stated; batches 1, 64, 1024.

    python benchmarks/speedup.py               # every case, CPU (+ CUDA case when present)
    python benchmarks/speedup.py --quick       # small sizes, one repeat: a smoke run
    python benchmarks/speedup.py --json out.json
    python benchmarks/speedup.py --cuda-only   # the 2:4 case alone (benchmarks/device_session.sh)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pai_core import structured  # noqa: E402
from pai_core.masks import prunable_names  # noqa: E402
from pai_core.models import build_model  # noqa: E402
from pai_core.selection import select  # noqa: E402
from pai_core.speedup import Row, as_dicts, markdown, measure  # noqa: E402


def magnitude_mask(model: nn.Module, density: float, scope: str = "global", seed: int | None = None) -> dict:
    """|w| (or, with a seed, uniform random scores) ranked to `density`."""
    params = dict(model.named_parameters())
    names = prunable_names(model)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    scores = {n: (params[n].detach().abs() if gen is None else torch.rand(params[n].shape, generator=gen))
              for n in names}
    return select(scores, {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}, density, scope)


def block_mask(model: nn.Module, density: float, block: int, seed: int = 0) -> dict:
    """Whole block×block tiles kept at random, `density` of them per layer (layers whose sides
    `block` does not divide stay dense)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    mask = {}
    for n in prunable_names(model):
        rows, cols = params[n].shape
        if rows % block or cols % block:
            mask[n] = torch.ones(rows, cols, dtype=torch.bool)
            continue
        tiles = torch.rand(rows // block, cols // block, generator=gen)
        k = max(1, round(density * tiles.numel()))
        keep = torch.zeros(tiles.numel(), dtype=torch.bool)
        keep[tiles.flatten().topk(k).indices] = True
        mask[n] = keep.view_as(tiles).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return mask


def wide_mlp(width: int, depth: int = 3, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes)).eval()


def cases(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    opts = dict(batches=args.batches, repeats=args.repeats, min_run_s=args.min_run_s, log=print)
    lenet = build_model("lenet_300_100", (1, 28, 28), 10, seed=0).eval()
    rows += measure("LeNet-300-100, 98 %", lenet, magnitude_mask(lenet, 0.02), (1, 28, 28),
                    formats=("dense", "csr", "bsr"), block_size=2, **opts)
    width = args.width
    mlp = wide_mlp(width)
    rows += measure(f"MLP {width}×{width}×3, 98 %", mlp, magnitude_mask(mlp, 0.02, "layerwise", seed=0), (width,),
                    formats=("dense", "csr"), **opts)
    blocky = wide_mlp(width, classes=32)  # a head whose 32 rows split into 32×32 blocks too
    rows += measure(f"MLP {width}×{width}×3, 98 % in 32×32 blocks", blocky, block_mask(blocky, 0.02, 32), (width,),
                    formats=("bsr", "csr"), block_size=32, **opts)
    lenet5 = build_model("lenet5", (1, 28, 28), 10, seed=0).eval()
    rows += filter_case("LeNet-5, half the filters", lenet5, (1, 28, 28), "all", opts)
    small = dict(opts, batches=[b for b in args.batches if b <= 64])  # batch 1024 of a ResNet-56: minutes per call
    resnet = build_model("resnet56", (3, 32, 32), 10, seed=0, width=0.5 if args.quick else 1.0).eval()
    rows += filter_case("ResNet-56 (A), half of every channel group", resnet, (3, 32, 32), "all", small)
    rows += filter_case("ResNet-56 (A), half of the blocks' inner channels", resnet, (3, 32, 32), "unshared", small)
    mobile = lively_norms(build_model("mobilenet_v2", (3, 64, 64), 10, seed=0, width=0.5 if args.quick else 1.0))
    rows += filter_case("MobileNetV2, half of every channel group", mobile, (3, 64, 64), "all", small)
    rows += semi_structured_case(args)
    return rows


@torch.no_grad()
def lively_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and shifts drawn at random, in eval mode. At torchvision's init a
    MobileNetV2's outputs are about 1e-9, so an output check could not tell a wrong export from
    a right one; with these they are about 1."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
    return model.eval()


def filter_case(name: str, model: nn.Module, in_shape: tuple[int, ...], layers: str, opts: dict) -> list[Row]:
    """Half of the candidate channel groups (l1 of the weights) removed: the physically smaller
    net against the dense one, beside the ratio of their FLOPs. `layers`: see
    structured.unit_families (`unshared` keeps a ResNet's residual stream whole)."""
    params = dict(model.named_parameters())
    names = prunable_names(model)
    half = structured.select_filters(model, {n: params[n].detach().abs() for n in names},
                                     {n: torch.ones_like(params[n], dtype=torch.bool) for n in names},
                                     0.5, "l1", layers=layers)
    c = structured.costs(model, half, in_shape)
    flop_ratio = c["dense"]["flops"] / c["pruned"]["flops"]
    found = measure(name, model, half, in_shape, formats=("structured",), **opts)
    return [Row(**{**r.__dict__, "note": f"FLOPs {flop_ratio:.2f}× fewer"}) for r in found]


def semi_structured_case(args: argparse.Namespace) -> list[Row]:
    """2:4 in float16 on a capable GPU against the same net dense in float16, called eagerly and
    replayed from CUDA graphs (pai_core.speedup's docstring says why both): the MLP with each
    layer's bias added after the product (the export's default) and fused into the kernel, then
    one large Linear (the issue's goal: >= 1.3x) the same ways."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        print("2:4 semi_structured: not measured (no CUDA device with compute capability >= 8.0 here)")
        return []
    mlp = wide_mlp(args.width)
    rows = two_four_rows(f"MLP {args.width}×{args.width}×3, 2:4", mlp, args.width, args)
    torch.manual_seed(0)
    large = nn.Sequential(nn.Linear(args.large, args.large)).eval()
    return rows + two_four_rows(f"Linear {args.large}×{args.large}, 2:4", large, args.large, args, head_dense=False)


def two_four_rows(name: str, model: nn.Module, width: int, args: argparse.Namespace,
                  head_dense: bool = True) -> list[Row]:
    """`model` at 2:4 (magnitude), exported and timed against itself dense in float16: eager and
    CUDA graph, bias added and bias fused. `head_dense`: the last Linear (a 10-row head, too small
    for 2:4 to help) is left out of the mask and stays a dense float16 layer."""
    from pai_core.export import masked_copy
    from pai_core.selection import select_nm
    from pai_core.sparse_layers import HalfPrecision

    params = dict(model.named_parameters())
    names = prunable_names(model)[:-1] if head_dense else prunable_names(model)
    mask = select_nm({n: params[n].detach().abs() for n in names},
                     {n: torch.ones_like(params[n], dtype=torch.bool) for n in names}, 2, 4)
    half = HalfPrecision(masked_copy(model, mask).half())  # the fair baseline: the same precision, dense
    rows = []
    for graph, fuse in ((False, False), (True, False), (True, True)):
        note = "vs dense float16, " + ("CUDA graph" if graph else "eager") + (", bias fused" if fuse else "")
        rows += measure(name, model, mask, (width,), formats=("semi_structured",), device="cuda",
                        batches=args.batches, repeats=args.repeats, min_run_s=args.min_run_s, baseline=half,
                        cuda_graph=graph, fuse_bias=fuse, note=note, log=print)
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="width 512, batches 1 and 64, one repeat")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--large", type=int, default=8192, help="the single 2:4 Linear's width (CUDA case)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-run-s", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--cuda-only", action="store_true", help="only the 2:4 case on CUDA (a GPU session's run)")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.batches, args.repeats, args.min_run_s = 512, [1, 64], 1, 0.005
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    rows = semi_structured_case(args) if args.cuda_only else cases(args)
    print()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(as_dicts(rows), indent=1))
    return rows


if __name__ == "__main__":
    main()

"""NTK-SAP (Wang et al., ICLR 2023, "Improving neural network pruning by aligning training
dynamics"): keep the connections the network's neural tangent kernel spectrum depends on most,
estimated without data and without the init's own values.

The NTK's trace is E_n ||f(x; θ) − f(x; θ + εn)||² / ε² to first order, for Gaussian noise n on the
weights. With a mask c on the prunable weights (w = c ⊙ θ), the score of a connection is
|∂/∂c Σ_s Σ_x ||f(x; c ⊙ θ_s) − f(x; c ⊙ (θ_s + ε n_s))||²| at the current mask, summed over
samples s, each a *fresh* random init θ_s of the architecture ("multi-sampling"), a fresh noise
n_s and a batch x of standard Gaussian inputs of the data's shape: the score depends on neither
the data nor the init being pruned, only on the architecture and the mask so far.

BatchNorm (the reference's `prune-train-mode`): each sample's statistics are those of its own
Gaussian batch (reset, one train-mode pass with momentum 1), then both passes run in eval mode,
so they share the statistics and are not differentiated through them.

Defaults are the reference's (YiteWang/NTK-SAP, scripts/run.sh for CIFAR): ε = 0.01, R = 5
samples per round, a pruning set of 10 inputs per class in batches of 256, one fresh init per
batch; 20 score-and-prune rounds on the exponential schedule (prune_at_init's default for it).
One departure, for a cleaner estimate: the perturbed copy is the sample's init plus noise on the
prunable weights only, everything else (biases, BatchNorm) equal to the sample's; the reference
perturbs a copy made once, whose biases stay those of the first init.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from pai_core.criteria.registry import NoParams, ScoreInputs, register
from pai_core.interpolation import recompute_bn

class NtkSapParams(NoParams):  # frozen, unknown fields refused
    samples: int = Field(5, gt=0, le=1000, description="fresh inits R per round, each over the whole pruning set "
                                                       "(reference script: 5)")
    epsilon: float = Field(0.01, gt=0, le=10, description="std of the weight perturbation ε (reference: 0.01)")
    inputs_per_class: int = Field(10, gt=0, le=10_000, description="Gaussian inputs per class in the pruning set "
                                                                   "(reference: 10)")
    batch_size: int = Field(256, gt=0, le=100_000, description="inputs per batch; each batch gets its own fresh init "
                                                               "(reference: 256)")


def batch_norm_statistics(net: nn.Module, x: torch.Tensor) -> None:
    """Make every BatchNorm's running statistics exactly `x`'s batch statistics (the shared
    re-estimate, here over one batch), then eval mode."""
    recompute_bn(net, [(x, None)])
    net.eval()


def sample_grads(net: nn.Module, mask: dict[str, torch.Tensor], x: torch.Tensor,
                 noise: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """∂/∂c Σ_x ||f(x; c ⊙ θ) − f(x; c ⊙ (θ + noise))||² at c = mask, θ = `net`'s weights."""
    theta = {n: p.detach() for n, p in net.named_parameters()}
    c = {n: mask[n].to(theta[n].dtype).requires_grad_() for n in mask}
    clean = {**theta, **{n: theta[n] * c[n] for n in mask}}
    moved = {**theta, **{n: (theta[n] + noise[n]) * c[n] for n in mask}}
    gap = functional_call(net, clean, (x,)) - functional_call(net, moved, (x,))
    loss = (gap.flatten(1).norm(dim=1) ** 2).sum()
    return dict(zip(mask, torch.autograd.grad(loss, [c[n] for n in mask])))


@register("ntk_sap", params=NtkSapParams, stochastic=True,
          description="Wang et al. 2023: |∂/∂mask| of the NTK trace estimate ||f(θ) − f(θ+εn)||², data-free, "
                      "over fresh inits (20 rounds)")
def ntk_sap(model, mask, inputs: ScoreInputs, params: NtkSapParams) -> dict[str, torch.Tensor]:
    if inputs.rebuild is None:
        raise ValueError("ntk_sap draws fresh inits of the architecture: ScoreInputs.rebuild is required")
    device = next(model.parameters()).device
    total = params.inputs_per_class * inputs.num_classes
    sizes = [min(params.batch_size, total - i) for i in range(0, total, params.batch_size)]
    scores = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters() if n in mask}
    for _ in range(params.samples):
        for size in sizes:  # the reference draws a fresh init for every batch of every sample
            seed = int(torch.randint(2 ** 62, (1,), generator=inputs.generator))
            net = inputs.rebuild(seed).to(device)
            x = torch.randn((size, *inputs.in_shape), generator=inputs.generator).to(device)
            named = dict(net.named_parameters())
            noise = {n: (params.epsilon * torch.randn(named[n].shape, generator=inputs.generator)).to(device)
                     for n in mask}
            batch_norm_statistics(net, x)
            for n, g in sample_grads(net, {n: m.to(device) for n, m in mask.items()}, x, noise).items():
                scores[n] += g.double()
    out = {n: s.abs() * mask[n].to(device) for n, s in scores.items()}  # a pruned weight scores 0 (reference)
    if not all(math.isfinite(float(s.sum())) for s in out.values()):
        raise ValueError("ntk_sap: non-finite scores (the perturbed outputs overflowed); lower params.epsilon")
    return out

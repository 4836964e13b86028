"""Sparse selection: learn which weights to keep, never the weights themselves.

edge-popup (Ramanujan et al. 2020): a score per weight; the forward pass uses the top
`keep` fraction of each layer by |score| and the straight-through estimator passes the
gradient to every score; weights are frozen at a signed Kaiming constant, ±sqrt(2/fan_in).
Supermask (Zhou et al. 2019): the mask is sampled from Bernoulli(σ(score)) at every step,
gradients pass straight through the sample to σ(score); weights stay at their init.
Evaluation of a supermask is `sampled` (one fixed-seed sample: a sparse net) or `expected`
(w ⊙ σ(s): a dense net, as the paper also reports). The wrapped model's parameters have
requires_grad off, so an optimizer over `Selector.parameters()` moves only the scores.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from pai_core.masks import Mask


class _TopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int) -> torch.Tensor:
        keep = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
        keep[torch.sort(scores.flatten(), descending=True, stable=True).indices[:k]] = 1
        return keep.view_as(scores)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def signed_kaiming_constant(w: torch.Tensor) -> torch.Tensor:
    fan_in = w[0].numel()
    return torch.sign(w) * math.sqrt(2.0 / fan_in)


class Selector(nn.Module):
    def __init__(self, model: nn.Module, names: list[str], method: str, keep: float = 0.5,
                 evaluation: str = "sampled", seed: int = 0):
        super().__init__()
        self.model, self.names, self.method, self.keep, self.evaluation, self.seed = \
            model, names, method, keep, evaluation, seed
        params = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        self.scores = nn.ParameterDict()
        for i, n in enumerate(names):
            w = params[n]
            bound = 1 / math.sqrt(w[0].numel())  # a Kaiming-uniform-like spread for the scores
            s = (torch.rand(w.shape, generator=g) * 2 - 1) * bound
            self.scores[str(i)] = nn.Parameter(s.to(w.device, w.dtype))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # resumable sampling

    def masks(self, binary: bool | None = None) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        out = {}
        for i, n in enumerate(self.names):
            s = self.scores[str(i)]
            if self.method == "edge_popup":
                out[n] = _TopK.apply(s.abs(), round(self.keep * s.numel()))  # d|s|/ds flows back
            elif self.training or (binary and self.evaluation == "sampled"):
                prob = torch.sigmoid(s)
                gen = torch.Generator(device=s.device).manual_seed(
                    (self.seed * 1_000_003 + int(self.step) * 1009 + i) % 2**63 if self.training else self.seed)
                sample = torch.bernoulli(prob.detach(), generator=gen)
                out[n] = sample + prob - prob.detach()
            elif binary is False or self.evaluation == "expected":
                out[n] = torch.sigmoid(s)
            else:
                out[n] = self.masks(binary=True)[n]
            out[n] = out[n].to(params[n].dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.step += 1
        params = dict(self.model.named_parameters())
        weights = {n: params[n] * m for n, m in self.masks().items()}
        return functional_call(self.model, weights, (x,), strict=False)

    @torch.no_grad()
    def result(self) -> tuple[dict[str, torch.Tensor], Mask]:
        """The evaluated network: (state_dict to store, binary mask)."""
        was = self.training
        self.eval()
        masks = self.masks(binary=True) if not (self.method == "supermask" and self.evaluation == "expected") \
            else self.masks(binary=False)
        self.train(was)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.method == "supermask" and self.evaluation == "expected":
            for n, m in masks.items():
                state[n] = state[n] * m  # w ⊙ σ(s): dense
            return state, {n: torch.ones_like(m, dtype=torch.bool).cpu() for n, m in masks.items()}
        return state, {n: m.bool().cpu() for n, m in masks.items()}

"""Sparse selection: learn which weights to keep, never the weights themselves.

edge-popup (Ramanujan et al. 2020): a score per weight; the forward pass uses the top
`keep` fraction of each layer by |score| and the straight-through estimator passes the
gradient to every score; weights are frozen at a signed Kaiming constant, ±sqrt(2/fan_in).
Supermask (Zhou et al. 2019): the mask is sampled from Bernoulli(σ(score)) at every step,
gradients pass straight through the sample to σ(score); weights stay at their init.
biprop (Diffenderfer & Kailkhura 2021, multi-prize tickets MPT-1/32): edge-popup's top-k over
*binarized* frozen weights, α·sign(w) per layer with α = the mean |w| of the kept weights
(chrundle/biprop utils/conv_type.py GetQuantnet_binary: α·mask forward, the score gradient
g·|w| backward, which is dL/dw_eff ⊙ w as in edge-popup; α itself is not differentiated).
The wrapped model's parameters have requires_grad off, so an optimizer over
`Selector.parameters()` moves only the scores.

Reference behaviour each supermask default follows (uber-research/deconstructing-lottery-tickets):
- score_init="constant", score_constant=0.0: masked_networks.py, MaskedDense/MaskedConv2D.build
  start every mask score of every layer at Constant(sigmoid_bias), and train_supermask.py
  make_parser sets --sigmoid_bias 0, so every weight starts at σ(0) = 0.5.
  "uniform" (U(±1/sqrt(fan_in)), our pre-option behaviour and hidden-networks'
  kaiming_uniform_(a=sqrt(5)) for edge-popup scores) stays available by name.
- probability = σ(score) and a training sample Bernoulli(σ(s)) + σ(s) - stop_grad(σ(s)):
  masked_networks.py get_effective_mask.
- evaluation="sampled_mean", eval_samples=10: train_supermask.py train_and_eval ends with
  "eval 10 times from different random bernoullies" and reports np.mean of the 10 test
  accuracies (and losses); each pass draws a fresh mask for the whole test set
  (test_batch_size 0 = the whole set). So it averages accuracies of 10 masks, not logits.
- evaluation="expected": get_effective_mask with --round_mask evaluates round(σ(s)), i.e.
  keep iff σ(s) > 0.5 (TF rounds half to even, so σ(s) = 0.5 is dropped). This is the only
  deterministic evaluation in the reference; it never evaluates w ⊙ σ(s). The reference pairs it
  with --round_mask training (half the entries rounded, half left at σ(s)); here training is
  always the Bernoulli rule above, only the evaluation rule is taken.
- "sampled" (one fixed-seed sample) and "expected_dense" (w ⊙ σ(s), dense; this module's
  former "expected") are kept as named alternatives.
`Selector.paper_defaults(method)` returns these settings.
"""
from __future__ import annotations

import copy
import hashlib
import math
from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from pai_core.masks import Mask

SCORE_INITS = ("constant", "uniform")
EVALUATIONS = ("sampled", "expected", "sampled_mean", "expected_dense")
PAPER_DEFAULTS: dict[str, dict] = {
    "supermask": {"score_init": "constant", "score_constant": 0.0,
                  "evaluation": "sampled_mean", "eval_samples": 10},
    "edge_popup": {"score_init": "uniform"},
    "biprop": {"score_init": "uniform"},
}
TOP_K = ("edge_popup", "biprop")  # the top `keep` of each layer by |score|


class _TopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int) -> torch.Tensor:
        keep = torch.zeros(scores.numel(), dtype=scores.dtype, device=scores.device)
        keep[torch.sort(scores.flatten(), descending=True, stable=True).indices[:k]] = 1
        return keep.view_as(scores)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GainedTopK(torch.autograd.Function):
    """biprop's α·mask for binary weights α·sign(w): forward the top-k mask times the mean |w| of
    the kept weights; backward the incoming gradient times |w| to every score."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, weight: torch.Tensor, k: int) -> torch.Tensor:
        keep = _TopK.forward(ctx, scores, k)
        ctx.save_for_backward(weight.abs())
        return keep * binary_gain(weight, keep)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        magnitude, = ctx.saved_tensors
        return grad * magnitude, None, None


def binary_gain(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """α = ||keep ⊙ w||₁ / ||keep||₀: the scale of a layer's binarized kept weights."""
    return (weight.detach().abs() * keep).sum() / keep.sum().clamp(min=1)


def signed_kaiming_constant(w: torch.Tensor) -> torch.Tensor:
    fan_in = w[0].numel()
    return torch.sign(w) * math.sqrt(2.0 / fan_in)


def _sample_seed(seed: int, sample: int, layer: int) -> int:
    """An independent 63-bit seed per (run seed, sample, layer)."""
    digest = hashlib.blake2b(f"supermask-eval:{seed}:{sample}:{layer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@torch.no_grad()
def sample_masks(scores: Mapping[str, torch.Tensor], seed: int, n: int) -> list[Mask]:
    """The `sampled_mean` masks: n draws of Bernoulli(σ(s)), independent across samples and layers.

    `scores` maps parameter name → score, in the Selector's `names` order (its stored `scores`
    payload). Drawn on the CPU from seeded generators, so they do not depend on the device.
    """
    out = []
    for k in range(n):
        mask = {}
        for i, (name, s) in enumerate(scores.items()):
            gen = torch.Generator().manual_seed(_sample_seed(seed, k, i))
            mask[name] = torch.bernoulli(torch.sigmoid(s.detach().cpu().float()), generator=gen).bool()
        out.append(mask)
    return out


class _Masked(nn.Module):
    """A plain model seen through a mask (w ⊙ m), for `evaluate` without copying weights."""

    def __init__(self, model: nn.Module, mask: Mapping[str, torch.Tensor]):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        weights = {n: params[n] * m.to(params[n].device, params[n].dtype) for n, m in self.mask.items()}
        return functional_call(self.model, weights, (x,), strict=False)


def mean_over_masks(model: nn.Module, masks: list[Mapping[str, torch.Tensor]], split,
                    evaluate: Callable | None = None) -> dict[str, float]:
    """Mean over masks of evaluate(w ⊙ mask_k, split): the reference's final supermask number.

    `model` holds the unmasked frozen weights; each metric (loss, acc) is averaged over masks.
    """
    if evaluate is None:
        from pai_core.training import evaluate
    rows = []
    for m in masks:
        probe = _Masked(model, m).train(model.training)  # evaluate() restores the probe's mode
        rows.append(evaluate(probe, split))
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


class Selector(nn.Module):
    """Scores over frozen weights.

    score_init (supermask only; None = the reference's "constant"): "constant" starts every
    score at `score_constant` (σ = 0.5 at 0.0); "uniform" draws U(±1/sqrt(fan_in)) from `seed`.
    edge-popup always uses "uniform". evaluation (supermask only): see EVALUATIONS and the
    module docstring; eval-mode forward uses `eval_masks()[0]`, which `result()` stores.
    `evaluation` keeps its former default "sampled"; `Selector(model, names, "supermask",
    **Selector.paper_defaults("supermask"))` is the reference configuration.
    """

    def __init__(self, model: nn.Module, names: list[str], method: str, keep: float = 0.5,
                 evaluation: str = "sampled", seed: int = 0, *, score_init: str | None = None,
                 score_constant: float = 0.0, eval_samples: int = 10):
        super().__init__()
        if method not in PAPER_DEFAULTS:
            raise ValueError(f"unknown selection method {method!r}")
        if evaluation not in EVALUATIONS:
            raise ValueError(f"evaluation must be one of {EVALUATIONS}, not {evaluation!r}")
        score_init = score_init or PAPER_DEFAULTS[method]["score_init"]
        if score_init not in SCORE_INITS or (method in TOP_K and score_init != "uniform"):
            raise ValueError(f"score_init {score_init!r} is not available for {method}")
        if eval_samples < 1:
            raise ValueError("eval_samples must be at least 1")
        self.model, self.names, self.method, self.keep, self.evaluation, self.seed = \
            model, names, method, keep, evaluation, seed
        self.score_init, self.score_constant, self.eval_samples = score_init, score_constant, eval_samples
        params = dict(model.named_parameters())
        for p in model.parameters():
            p.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        self.scores = nn.ParameterDict()
        for i, n in enumerate(names):
            w = params[n]
            if score_init == "constant":
                s = torch.full(w.shape, float(score_constant))
            else:
                bound = 1 / math.sqrt(w[0].numel())  # kaiming_uniform_(a=sqrt(5)): U(±1/sqrt(fan_in))
                s = (torch.rand(w.shape, generator=g) * 2 - 1) * bound
            self.scores[str(i)] = nn.Parameter(s.to(w.device, w.dtype))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # resumable sampling

    @classmethod
    def paper_defaults(cls, method: str) -> dict:
        """The reference's settings for `method`, as keyword arguments (see the module docstring)."""
        return dict(PAPER_DEFAULTS[method])

    def _named_scores(self) -> dict[str, torch.Tensor]:
        return {n: self.scores[str(i)] for i, n in enumerate(self.names)}

    def probabilities(self) -> dict[str, torch.Tensor]:
        """σ(s) per layer: the supermask's keep probabilities."""
        return {n: torch.sigmoid(s.detach()) for n, s in self._named_scores().items()}

    @torch.no_grad()
    def eval_masks(self, first_only: bool = False) -> list[dict[str, torch.Tensor]]:
        """The mask(s) evaluation uses: one for every option but `sampled_mean` (eval_samples,
        or only its first with `first_only`, the one forward in eval mode and `result` use).

        edge_popup: top-k of |s|. sampled: one Bernoulli(σ(s)) draw, each layer's generator
        seeded with `seed`. expected: σ(s) > 0.5. sampled_mean: `sample_masks(scores, seed,
        eval_samples)`. These are bool; expected_dense gives the float σ(s).
        """
        scores = self._named_scores()
        if self.method in TOP_K:
            return [{n: _TopK.apply(s.abs(), round(self.keep * s.numel())).bool() for n, s in scores.items()}]
        if self.evaluation == "sampled_mean":
            return sample_masks(scores, self.seed, 1 if first_only else self.eval_samples)
        probs = self.probabilities()
        if self.evaluation == "expected":
            return [{n: p > 0.5 for n, p in probs.items()}]
        if self.evaluation == "expected_dense":
            return [probs]
        out = {}
        for n, p in probs.items():
            gen = torch.Generator(device=p.device).manual_seed(self.seed)
            out[n] = torch.bernoulli(p, generator=gen).bool()
        return [out]

    def masks(self) -> dict[str, torch.Tensor]:
        """The masks the forward pass multiplies in: a differentiable draw in training."""
        params = dict(self.model.named_parameters())
        if not self.training and self.method == "supermask":
            first = self.eval_masks(first_only=True)[0]
            return {n: m.to(params[n].device, params[n].dtype) for n, m in first.items()}
        out = {}
        for i, n in enumerate(self.names):
            s = self.scores[str(i)]
            if self.method == "edge_popup":
                out[n] = _TopK.apply(s.abs(), round(self.keep * s.numel()))  # d|s|/ds flows back
            elif self.method == "biprop":  # α·mask: the forward multiplies it into sign(w)
                out[n] = _GainedTopK.apply(s.abs(), params[n], round(self.keep * s.numel()))
            else:
                prob = torch.sigmoid(s)
                gen = torch.Generator(device=s.device).manual_seed(
                    (self.seed * 1_000_003 + int(self.step) * 1009 + i) % 2**63)
                sample = torch.bernoulli(prob.detach(), generator=gen)
                out[n] = sample + prob - prob.detach()
            out[n] = out[n].to(params[n].dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.step += 1
        params = dict(self.model.named_parameters())
        frozen = {n: torch.sign(params[n]) if self.method == "biprop" else params[n] for n in self.names}
        weights = {n: frozen[n] * m for n, m in self.masks().items()}
        return functional_call(self.model, weights, (x,), strict=False)

    @torch.no_grad()
    def evaluate(self, split, evaluate: Callable | None = None) -> dict[str, float]:
        """Metrics under this Selector's evaluation: the mean over `eval_masks()` (one mask but
        for sampled_mean), each a whole pass over `split` with one mask, as the reference does."""
        model = self.model
        if self.method == "biprop":  # through its binary weights, α·sign(w)
            model = copy.deepcopy(self.model)
            model.load_state_dict(self.result()[0])
        return mean_over_masks(model, self.eval_masks(), split, evaluate)

    @torch.no_grad()
    def result(self) -> tuple[dict[str, torch.Tensor], Mask]:
        """The evaluated network: (state_dict to store, binary mask).

        The weights are the frozen ones (biprop: binarized, α·sign(w)); the mask is
        `eval_masks()[0]` (for sampled_mean the first of its samples, so it is one concrete draw of
        the distribution that was averaged).
        expected_dense stores w ⊙ σ(s) with an all-ones mask.
        """
        masks = self.eval_masks(first_only=True)[0]
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.method == "biprop":  # the binary weights the forward used: α·sign(w), α over the kept ones
            for n, m in masks.items():
                state[n] = torch.sign(state[n]) * binary_gain(state[n], m.to(state[n].dtype))
        if self.method == "supermask" and self.evaluation == "expected_dense":
            for n, m in masks.items():
                state[n] = state[n] * m.to(state[n].dtype)  # w ⊙ σ(s): dense
            return state, {n: torch.ones_like(m, dtype=torch.bool).cpu() for n, m in masks.items()}
        return state, {n: m.bool().cpu() for n, m in masks.items()}

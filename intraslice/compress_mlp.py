"""MLP compression of one decoder layer (IntraSlice §1.2, physically shrunk).

A rotation cannot pass through silu(gate) ⊙ up, a channel selection can: keep some intermediate
channels and reconstruct the dropped ones from the kept ones by least squares,
x_P ≈ x_K C_KK^-1 C_KP (C: covariance of the down_proj input), folded into down_proj:
W_down[:, K] += W_down[:, P] (C_KK^-1 C_KP)^T.

The fold's ridge (`ridge`, `--mlp-ridge`) is 0.3 * mean(diag C) by default, not the paper's 0.01: the
least-squares map learns correlations of the calibration text, and on text of another domain the
paper's fold removed less error than no fold at all (per-layer probe of the example model). A stronger
ridge keeps the fold to correlations that hold more broadly: at R = 0.2 other-domain perplexity fell
3.9% with the same-domain one unchanged (docs/results.md).

Which channels to keep:
- `score` (the paper, default): the largest C_jj ||W_down[:, j]||^2, each channel judged alone;
- `obs`: greedy backward elimination that sees the least-squares fold: repeatedly drop the
  channel whose removal, with all the others re-fitted, adds the least down_proj output error,
  ||w_j||^2 / [C^-1]_jj (the Optimal Brain Surgeon cost of removing a whole input column), then
  downdate C^-1 and the re-fitted weights. On the example model it cut each layer's output error
  by 2-7% but left perplexity unchanged, so it is an option, not the default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from intraslice.allocation import mlp_params
from intraslice.calibration import Covariance, damped, least_squares
from intraslice.compress_options import MLP_RIDGE
from intraslice.modeling_intraslice import MLP


def mlp_width(budget: float, hidden: int, intermediate: int, multiple: int) -> int:
    """Kept channels for a budget of weights: rounded to `multiple`, at least `multiple`, at most dense."""
    width = round(budget / mlp_params(hidden, 1) / multiple) * multiple
    return intermediate if width >= intermediate else max(multiple, width)


@torch.no_grad()
def compress_mlp(mlp: MLP, config, inputs: list[torch.Tensor], width: int, compensate: bool = True,
                 targets: list[torch.Tensor] | None = None, selection: str = "score",
                 ridge: float = MLP_RIDGE, weights: list[torch.Tensor] | None = None) -> MLP:
    """A physically smaller `MLP` with `width` channels, for normed layer inputs `inputs`.
    `targets`: what the down_proj output (without bias) should be, per batch; by default the
    layer's own unpruned output (the paper's reconstruction of the dropped channels). `weights`: each
    sample's weight [b] per batch in the statistics (channel scores and fold); equal by default."""
    weights = weights or [None] * len(inputs)
    cov = Covariance()
    for x, w in zip(inputs, weights):
        cov.add(activation(mlp, x), weights=w)
    down = mlp.down_proj.weight.double()
    kept = (obs_channels(cov.sum, down, width, ridge) if selection == "obs"
            else (cov.sum.diagonal() * down.pow(2).sum(0)).argsort(descending=True)[:width].sort().values)
    dropped = torch.ones(down.shape[1], dtype=torch.bool, device=down.device)
    dropped[kept] = False
    dropped = dropped.nonzero().flatten()
    new_down = down[:, kept]
    if compensate and len(dropped) and targets is None:
        q_t = least_squares(cov.sum[kept][:, kept], cov.sum[kept][:, dropped], ridge)  # x_P ≈ x_K q_t
        new_down = new_down + down[:, dropped] @ q_t.T
    elif compensate and len(dropped):
        cross = Covariance()
        for x, target, w in zip(inputs, targets, weights):
            cross.add(activation(mlp, x)[..., kept], target, w)
        new_down = least_squares(cov.sum[kept][:, kept], cross.sum, ridge).T
    new = MLP(config, width)
    new.gate_proj.weight.copy_(mlp.gate_proj.weight[kept])
    new.up_proj.weight.copy_(mlp.up_proj.weight[kept])
    new.down_proj.weight.copy_(new_down)
    if mlp.gate_proj.bias is not None:
        new.gate_proj.bias.copy_(mlp.gate_proj.bias[kept])
        new.up_proj.bias.copy_(mlp.up_proj.bias[kept])
        new.down_proj.bias.copy_(mlp.down_proj.bias)
    return new.to(down.device)


def obs_channels(gram: torch.Tensor, weight: torch.Tensor, width: int, ridge: float = MLP_RIDGE,
                 rounds: int = 32) -> torch.Tensor:
    """Sorted indices of the `width` input channels of `weight` [out, in] that survive greedy backward
    elimination under the input Gram matrix `gram` (float64). Each of `rounds` rounds drops the
    cheapest channels at once and re-fits the rest with the block (Schur complement) form of the
    downdate, which keeps the cost at a few dozen matrix products."""
    inverse = torch.linalg.inv(damped(gram, ridge))
    alive = torch.arange(weight.shape[1], device=weight.device)
    step = max(1, -(-(len(alive) - width) // rounds))
    while len(alive) > width:
        cost = weight.pow(2).sum(0) / inverse.diagonal()
        drop = cost.topk(min(step, len(alive) - width), largest=False).indices
        keep = torch.ones(len(alive), dtype=torch.bool, device=weight.device)
        keep[drop] = False
        refit = torch.linalg.solve(inverse[drop][:, drop], inverse[drop][:, keep])
        weight = weight[:, keep] - weight[:, drop] @ refit
        inverse = inverse[keep][:, keep] - inverse[keep][:, drop] @ refit
        alive = alive[keep]
    return alive.sort().values


def activation(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """The down_proj input silu(gate x) * up x."""
    return F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)

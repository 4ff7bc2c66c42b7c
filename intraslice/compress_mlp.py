"""MLP compression of one decoder layer (IntraSlice §1.2, physically shrunk).

A rotation cannot pass through silu(gate) ⊙ up, a channel selection can: keep the intermediate
channels with the largest C_jj ||W_down[:, j]||^2 (C: covariance of the down_proj input), and
reconstruct the dropped ones from the kept ones by least squares, x_P ≈ x_K C_KK^-1 C_KP, folded into
down_proj: W_down[:, K] += W_down[:, P] (C_KK^-1 C_KP)^T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from intraslice.allocation import mlp_params
from intraslice.calibration import Covariance, least_squares
from intraslice.modeling_intraslice import MLP


def mlp_width(budget: float, hidden: int, intermediate: int, multiple: int) -> int:
    """Kept channels for a budget of weights: rounded to `multiple`, at least `multiple`, at most dense."""
    width = round(budget / mlp_params(hidden, 1) / multiple) * multiple
    return intermediate if width >= intermediate else max(multiple, width)


@torch.no_grad()
def compress_mlp(mlp: MLP, config, inputs: list[torch.Tensor], width: int, compensate: bool = True,
                 targets: list[torch.Tensor] | None = None) -> MLP:
    """A physically smaller `MLP` with `width` channels, for normed layer inputs `inputs`.
    `targets`: what the down_proj output (without bias) should be, per batch; by default the
    layer's own unpruned output (the paper's reconstruction of the dropped channels)."""
    cov = Covariance()
    for x in inputs:
        cov.add(activation(mlp, x))
    down = mlp.down_proj.weight.double()
    scores = cov.sum.diagonal() * down.pow(2).sum(0)
    order = scores.argsort(descending=True)
    kept, dropped = order[:width].sort().values, order[width:].sort().values
    new_down = down[:, kept]
    if compensate and len(dropped) and targets is None:
        q_t = least_squares(cov.sum[kept][:, kept], cov.sum[kept][:, dropped])  # x_P ≈ x_K q_t
        new_down = new_down + down[:, dropped] @ q_t.T
    elif compensate and len(dropped):
        cross = Covariance()
        for x, target in zip(inputs, targets):
            cross.add(activation(mlp, x)[..., kept], target)
        new_down = least_squares(cov.sum[kept][:, kept], cross.sum).T
    new = MLP(config, width)
    new.gate_proj.weight.copy_(mlp.gate_proj.weight[kept])
    new.up_proj.weight.copy_(mlp.up_proj.weight[kept])
    new.down_proj.weight.copy_(new_down)
    if mlp.gate_proj.bias is not None:
        new.gate_proj.bias.copy_(mlp.gate_proj.bias[kept])
        new.up_proj.bias.copy_(mlp.up_proj.bias[kept])
        new.down_proj.bias.copy_(mlp.down_proj.bias)
    return new.to(down.device)


def activation(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """The down_proj input silu(gate x) * up x."""
    return F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)

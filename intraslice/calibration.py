"""Calibration activations and the float64 statistics the compressor gathers from them.

The calibration set lives as a list of hidden-state batches [b, T, hidden] (float32): the input of the
decoder layer being compressed. The compressor runs one layer at a time over it, so only one decoder
layer and these activations are resident.
"""
from __future__ import annotations

import torch
from torch import nn

DAMPING = 0.01  # every covariance gets DAMPING * mean(diag) added to its diagonal (the paper's choice)


def positions_for(hidden: torch.Tensor) -> torch.Tensor:
    """Positions 0..T-1 for every sequence of a batch [b, T, ...]."""
    b, t = hidden.shape[:2]
    return torch.arange(t, device=hidden.device).expand(b, t)


@torch.no_grad()
def embed_batches(embedding: torch.Tensor, tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Layer-0 inputs: the token embeddings of `tokens` [N, T], in batches of `batch_size`."""
    return [nn.functional.embedding(chunk, embedding).float() for chunk in tokens.split(batch_size)]


class Covariance:
    """Running sum of x^T y over the rows of batches [b, ..., d], in float64, each sample's rows weighted
    by its entry of `weights` [b] where given."""

    def __init__(self):
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> None:
        x, y = x.double(), None if y is None else y.double()
        if weights is not None:  # sqrt(w) on both factors: w x^T y, and x^T x stays a Gram matrix
            scale = weights.double().sqrt().view(-1, *[1] * (x.dim() - 1)).to(x.device)
            x, y = x * scale, None if y is None else y * scale
        x = x.reshape(-1, x.shape[-1])
        product = gram(x) if y is None else x.T @ y.reshape(-1, y.shape[-1])
        self.sum = product if self.sum is None else self.sum + product
        self.count += x.shape[0]


def gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """x^T x for x [n, d], from the blocks of columns on and above the diagonal only, the others being
    their transposes: 10 of 16 blocks, 30% less time for the example model's MLP inputs in float64."""
    d = x.shape[1]
    size = -(-d // blocks)
    out = x.new_empty(d, d)
    for start in range(0, d, size):
        block = x[:, start:start + size].T @ x[:, start:]
        out[start:start + size, start:] = block
        out[start:, start:start + size] = block.T
    return out


def damped(matrix: torch.Tensor, ridge: float = DAMPING) -> torch.Tensor:
    """`matrix` + ridge * mean(diag) * I (keeps solves and eigendecompositions stable)."""
    identity = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    return matrix + ridge * matrix.diagonal().mean() * identity


def eigh_descending(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors (columns) of a symmetric matrix, largest first, in float64."""
    values, vectors = torch.linalg.eigh(matrix.double())
    return values.flip(0), vectors.flip(1)


def least_squares(gram: torch.Tensor, cross: torch.Tensor, ridge: float = DAMPING) -> torch.Tensor:
    """argmin_Q ||Z Q - Y||^2 + ridge * mean(diag(Z^T Z)) ||Q||^2, from gram = Z^T Z and cross = Z^T Y
    (float64)."""
    return torch.linalg.solve(damped(gram.double(), ridge), cross.double())

"""Per-layer pruning ratios (attention, MLP) under one global parameter budget.

Methods (see docs and the paper digest, methods.md §1.3):
- `global-pca` (default, the paper's estimator): Fisher scores of multiplicative masks on the o_proj
  input and the down_proj input. Each head's mask gradient is taken in the head's PCA basis (exactly:
  diag(Q^T M Q), with M the per-head sum of x^T dL/dx and Q the eigenvectors of the head's input
  covariance), grouped into units of `head_dim/frac` principal components, largest first.
- `global`: the same with plain per-channel masks (no rotation), units of whole heads when frac = 1.
- `uniform`: every layer loses the same fraction.
Fisher importance of a unit = sum over sample groups of (sum of its gradients)^2. The gradients are
those of the log-likelihood of next tokens drawn from the model's own predictions (`labels="sampled"`,
the true Fisher information) by default, or of the text's own next tokens (`"text"`, the paper's
empirical Fisher): a text's labels add the model's systematic errors on that text to the scores, which
then favour the channels of the calibration's domain. The MLP keeps the
global top (1 - R) of its neurons; attention units take the rest of the budget, counted for the real
GQA layout (a query head costs its q/o rows plus its share of k/v). No layer loses more than 80%;
the excess goes to the other layers in proportion to their ratios.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from intraslice.calibration import eigh_descending
from intraslice.evaluate import backward_in_chunks, backward_layer_by_layer, backward_mean_nll
from intraslice.generated import draw_tokens
from intraslice.heap import release_free_memory
from intraslice.io import UserError
from intraslice.modeling_intraslice import dense_head_dim

MAX_LAYER_RATIO = 0.8


@dataclass
class LayerBudgets:
    """Pruning ratios per layer and the parameters each module may keep."""
    attention_ratio: list[float]
    mlp_ratio: list[float]
    attention_params: list[float]
    mlp_params: list[float]


def attention_params(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """Weights of q/k/v/o_proj (biases are not counted)."""
    return hidden * head_dim * (2 * num_heads + 2 * num_kv_heads)


def mlp_params(hidden: int, intermediate: int) -> int:
    return 3 * hidden * intermediate


def decoder_layer_params(hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int) -> int:
    """All weights of one decoder layer, the two RMSNorms included."""
    return attention_params(hidden, num_heads, num_kv_heads, head_dim) + mlp_params(hidden, intermediate) + 2 * hidden


def dense_module_params(config) -> tuple[int, int]:
    """Weights of one dense decoder layer's attention and of its MLP."""
    d = config.hidden_size
    return (attention_params(d, config.num_attention_heads, config.num_key_value_heads, dense_head_dim(config)),
            mlp_params(d, config.intermediate_size))


def module_keep_fraction(config, ratio: float) -> float:
    """Fraction of attention+MLP weights to keep so that `ratio` of all decoder-layer weights go
    (the norms are never pruned, so the modules lose slightly more than `ratio`)."""
    modules, norms = sum(dense_module_params(config)), 2 * config.hidden_size
    return ((1 - ratio) * (modules + norms) - norms) / modules


@dataclass
class FisherStats:
    """Sample-group gradient statistics from `fisher_statistics`."""
    head_grad_outer: torch.Tensor  # [groups, L, H, dh, dh]: per head, sum_t x_t^T dL/dx_t at the o_proj input
    head_cov: torch.Tensor          # [L, H, dh, dh]: per-head blocks of the o_proj input covariance
    neuron_grad: torch.Tensor       # [groups, L, I]: sum_t a_tj dL/da_tj at the down_proj input
    final_hidden: torch.Tensor      # [N, T, d]: the model's final normed hidden states of the samples, computed
                                    # on the way; the distillation's targets reuse them


def fisher_statistics(model, tokens: torch.Tensor, group_size: int, labels: str, seed: int = 0) -> FisherStats:
    """Forward and backward passes over `tokens`, weights frozen, recording mask gradients per group of
    `group_size` samples (the paper stabilises Fisher scores this way). The loss is the mean NLL of
    next tokens drawn from the model (`labels="sampled"`, seeded by `seed`) or of the text's own.

    One sample at a time, checkpointed by hand layer by layer (`backward_layer_by_layer`); the hooks
    take the statistics in the re-run of each layer with gradients."""
    config = model.config
    L, H, dh, I = (config.num_hidden_layers, config.num_attention_heads, dense_head_dim(config),
                   config.intermediate_size)
    groups = -(-tokens.shape[0] // group_size)
    stats = FisherStats(torch.zeros(groups, L, H, dh, dh, dtype=torch.float64),
                        torch.zeros(L, H, dh, dh, dtype=torch.float64),
                        torch.zeros(groups, L, I, dtype=torch.float64),
                        torch.empty(*tokens.shape, config.hidden_size))
    current = {"group": 0}

    def head_hook(index):
        def hook(module, args):
            if not torch.is_grad_enabled():
                return
            x = args[0]
            xs = x.detach().reshape(-1, H, dh)  # float32 until the gradient arrives: half the memory
            xs64 = xs.double()
            stats.head_cov[index] += torch.einsum("nha,nhb->hab", xs64, xs64).cpu()

            def record(grad: torch.Tensor) -> None:
                stats.head_grad_outer[current["group"], index] += torch.einsum(
                    "nha,nhb->hab", xs.double(), grad.reshape(-1, H, dh).double()).cpu()
            x.register_hook(record)
        return hook

    def neuron_hook(index):
        def hook(module, args):
            if not torch.is_grad_enabled():
                return
            a = args[0]
            a_flat = a.detach().reshape(-1, I)

            def record(grad: torch.Tensor) -> None:
                stats.neuron_grad[current["group"], index] += (
                    a_flat.double() * grad.reshape(-1, I).double()).sum(0).cpu()
            a.register_hook(record)
        return hook

    handles = []
    for index, layer in enumerate(model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(index)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(neuron_hook(index)))
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    try:
        for sample_index in tqdm(range(tokens.shape[0]), desc="allocation: gradients", unit="sample"):
            current["group"] = sample_index // group_size
            sample = tokens[sample_index:sample_index + 1]

            def backward_loss(hidden: torch.Tensor) -> None:
                if labels == "sampled":
                    backward_sampled_nll(model, hidden, generator)
                else:
                    backward_mean_nll(model, hidden, sample)
            stats.final_hidden[sample_index] = backward_layer_by_layer(model, sample, backward_loss)[0].cpu()
            release_free_memory()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def backward_sampled_nll(model, hidden: torch.Tensor, generator: torch.Generator) -> None:
    """Back-propagate the mean NLL of one next token per position [B, T], drawn from the model's own
    prediction there (from its final normed hidden states `hidden`): the per-token gradients then have
    mean zero, and their squares estimate the true Fisher information."""
    count = hidden.shape[0] * hidden.shape[1]

    def chunk_loss(h: torch.Tensor, span: slice) -> torch.Tensor:
        logits = model.lm_head(h).float().flatten(0, 1)
        drawn = draw_tokens(logits.detach().softmax(-1).cpu(), generator)
        return F.cross_entropy(logits, drawn.to(logits.device), reduction="sum") / count
    backward_in_chunks(hidden, chunk_loss)


def unit_importance(stats: FisherStats, method: str, frac: int) -> torch.Tensor:
    """Fisher importance [L, H * frac] of attention units: blocks of dh/frac channels (global) or of
    dh/frac principal components, largest eigenvalue first (global-pca)."""
    groups, L, H, dh, _ = stats.head_grad_outer.shape
    if dh % frac:
        raise ValueError(f"--global-frac {frac} does not divide head_dim {dh}")
    grads = torch.empty(groups, L, H, dh, dtype=torch.float64)
    for layer in range(L):
        for head in range(H):
            outer = stats.head_grad_outer[:, layer, head]
            if method == "global-pca":
                _, basis = eigh_descending(stats.head_cov[layer, head])
                outer = basis.T @ outer @ basis
            grads[:, layer, head] = outer.diagonal(dim1=-2, dim2=-1)
    units = grads.reshape(groups, L, H, frac, dh // frac).sum(-1)
    return units.pow(2).sum(0).reshape(L, H * frac)


def cap_ratios(ratios: torch.Tensor, cap: float = MAX_LAYER_RATIO) -> torch.Tensor:
    """Clip ratios at `cap`; give the excess to the uncapped layers in proportion to their ratios."""
    ratios = ratios.clone().double()
    for _ in range(len(ratios)):
        excess = (ratios - cap).clamp(min=0).sum()
        ratios = ratios.clamp(max=cap)
        open_layers = ratios < cap
        if excess <= 1e-12 or not open_layers.any():
            break
        weights = ratios * open_layers
        weights = weights / weights.sum() if weights.sum() > 0 else open_layers.double() / open_layers.sum()
        ratios = ratios + excess * weights
    return ratios


def global_ratios(scores: torch.Tensor, keep_count: int) -> torch.Tensor:
    """Per-layer pruned fraction when the `keep_count` globally top-scored units [L, U] are kept."""
    L, U = scores.shape
    keep_count = max(0, min(int(keep_count), L * U))
    kept = torch.zeros(L * U, dtype=torch.bool)
    kept[scores.flatten().argsort(descending=True)[:keep_count]] = True
    return 1 - kept.view(L, U).double().sum(1) / U


def split_removal(config, ratio: float, attention_share: float | None) -> tuple[float, float]:
    """Weights removed from all attention modules and from all MLPs together. `attention_share`: the
    fraction of the removed weights taken from attention, the MLPs giving the rest; None splits in
    proportion to their sizes (the paper: both lose `ratio`)."""
    L = config.num_hidden_layers
    dense_attention, dense_mlp = dense_module_params(config)
    proportional = dense_attention / (dense_attention + dense_mlp)
    share = proportional if attention_share is None else attention_share
    removed = (1 - module_keep_fraction(config, ratio)) * L * (dense_attention + dense_mlp)
    split = share * removed, (1 - share) * removed
    for module, taken, size in zip(("attention", "MLP"), split, (dense_attention, dense_mlp)):
        if taken > MAX_LAYER_RATIO * L * size + 1e-9:
            raise UserError(f"--attention-share {share:g} at --ratio {ratio:g} would remove {taken / (L * size):.0%} "
                            f"of the {module} weights (at most {MAX_LAYER_RATIO:.0%}); choose a share nearer "
                            f"{proportional:.2f}")
    return split


def allocate(config, ratio: float, method: str, stats: FisherStats | None, frac: int,
             attention_share: float | None = None) -> LayerBudgets:
    """Per-layer ratios and parameter budgets for removing `ratio` of the decoder-layer weights, split
    between attention and MLPs by `split_removal`; `global-pca` and `global` spread each module's part
    over the layers by Fisher importance, `uniform` evenly."""
    d, H, I, L = config.hidden_size, config.num_attention_heads, config.intermediate_size, config.num_hidden_layers
    dense_attention, dense_mlp = dense_module_params(config)
    attention_removed, mlp_removed = split_removal(config, ratio, attention_share)
    kept_neurons = round(L * I - mlp_removed / mlp_params(d, 1))
    attention_budget = L * dense_attention - attention_removed
    if method == "uniform":
        mlp_ratio = torch.full((L,), 1 - kept_neurons / (L * I), dtype=torch.float64)
        attention_ratio = torch.full((L,), attention_removed / (L * dense_attention), dtype=torch.float64)
    else:
        mlp_ratio = global_ratios(stats.neuron_grad.pow(2).sum(0), kept_neurons)
        unit_frac = frac if method == "global-pca" else 1
        unit_cost = dense_attention / (H * unit_frac)
        attention_ratio = global_ratios(unit_importance(stats, method, unit_frac),
                                        round(attention_budget / unit_cost))
    attention_ratio, mlp_ratio = cap_ratios(attention_ratio), cap_ratios(mlp_ratio)
    return LayerBudgets(attention_ratio.tolist(), mlp_ratio.tolist(),
                        ((1 - attention_ratio) * dense_attention).tolist(), ((1 - mlp_ratio) * dense_mlp).tolist())

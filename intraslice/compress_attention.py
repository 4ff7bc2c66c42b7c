"""Attention compression of one decoder layer (IntraSlice §1.1, physically shrunk).

1. Statistics on the layer's (already-compressed-upstream) inputs: the covariance C of the o_proj
   input X, and per head and dim the mean |q ⊙ k| after RoPE.
2. Shape: Wanda-style channel scores s_j = C_jj ||W_o[:, j]||^2; per head, the score spread over its
   PCA spectrum. Candidates: GQA-consistent shapes (whole KV groups kept or dropped, the same number
   of query heads in every kept group, since vLLM needs num_heads % num_kv_heads == 0; one head_dim
   from the allowed set; counts divisible by the tensor-parallel size) within the parameter budget.
   The paper keeps the one with the most retained score (`select="score"`); that score does not see
   what halving the Q/K pairs costs, and on SmolLM2 it cut every layer to head_dim 32 (2.4x
   perplexity at R = 0.3). By default (`select="error"`) the best-scored candidates are compared by
   the measured error of their least-squares fit (step 4) on a probe subset of the calibration data.
3. Q/K: per kept KV group, the head_dim/2 rotate-half pairs (j, j + d/2) with the largest summed
   |q ⊙ k| of the group's kept heads; each keeps its original rotary frequency (`rope_freq_idx`).
4. V/O: recompute the attention output X' with the kept heads and pairs; per kept KV group the top
   head_dim eigenvectors U_g of the summed covariance blocks of its kept heads (block-intra PCA, exact
   through softmax); W_v ← U_g^T W_v. The least-squares map Q_t from the reduced output Z = X'P to the
   original X is folded into o_proj: W_o ← W_o Q_t^T. The softmax scale stays 1/sqrt(dense head_dim).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F

from intraslice.allocation import attention_params
from intraslice.calibration import Covariance, eigh_descending, least_squares, positions_for
from intraslice.modeling_intraslice import Attention, LayerDims, apply_rope


@dataclass(frozen=True)
class AttentionShape:
    """Which parts of the dense attention survive, in dense indices (all lists sorted)."""
    kv_groups: tuple[int, ...]              # kept KV heads
    heads: tuple[tuple[int, ...], ...]      # per kept KV group: its kept query heads (equal counts)
    head_dim: int
    pairs: tuple[tuple[int, ...], ...]      # per kept KV group: kept rotate-half pair indices

    @property
    def num_heads(self) -> int:
        return sum(len(h) for h in self.heads)

    def kept_heads(self) -> list[int]:
        return [h for group in self.heads for h in group]

    def kv_of_head(self) -> torch.Tensor:
        """For each kept query head, the position of its KV group among the kept groups."""
        return torch.tensor([g for g, group in enumerate(self.heads) for _ in group])

    def dense_dims(self, dense_head_dim: int) -> list[torch.Tensor]:
        """Per kept group, the dense head dims kept for Q/K, laid out as pair t at (t, t + head_dim/2)."""
        return [torch.tensor(list(p) + [j + dense_head_dim // 2 for j in p]) for p in self.pairs]


@dataclass
class AttentionOptions:
    head_dims: tuple[int, ...]  # allowed per-layer head dims
    tp_size: int = 1
    compensate: bool = True     # least-squares Q_t folded into o_proj
    select: str = "error"       # shape choice: "score" (the paper's retained score) or "error" (measured)


PROBE_BATCHES = 2  # calibration batches on which candidate shapes are compared
MAX_PROBED = 8     # candidates compared, best retained score first


def rotated_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, T, dh] and k [B, G, T, dh] after RoPE, and v [B, G, T, dh], of normed inputs x."""
    B, T, _ = x.shape
    d = attn.dims
    cos, sin = attn.rope_tables(positions_for(x))
    group = d.num_heads // d.num_kv_heads
    q = apply_rope(attn.q_proj(x).view(B, T, d.num_heads, d.head_dim),
                   cos.repeat_interleave(group, 2), sin.repeat_interleave(group, 2))
    k = apply_rope(attn.k_proj(x).view(B, T, d.num_kv_heads, d.head_dim), cos, sin)
    v = attn.v_proj(x).view(B, T, d.num_kv_heads, d.head_dim)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_of_head: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Per-head attention output [B, T, heads, dv]; query head h reads KV head kv_of_head[h]."""
    out = F.scaled_dot_product_attention(q, k[:, kv_of_head], v[:, kv_of_head], is_causal=True, scale=scale)
    return out.transpose(1, 2)


@dataclass
class AttentionStatistics:
    covariance: torch.Tensor   # [D, D] of the o_proj input X (float64)
    qk: torch.Tensor           # [H, dh] mean |q ⊙ k| after RoPE
    outputs: list[torch.Tensor]  # X per batch [b, T, H, dh], the least-squares target


@torch.no_grad()
def attention_statistics(attn: Attention, inputs: list[torch.Tensor]) -> AttentionStatistics:
    d = attn.dims
    kv_of_head = torch.arange(d.num_heads) // (d.num_heads // d.num_kv_heads)
    cov, outputs, tokens = Covariance(), [], 0
    qk = torch.zeros(d.num_heads, d.head_dim, dtype=torch.float64, device=inputs[0].device)
    for x in inputs:
        q, k, v = rotated_qkv(attn, x)
        qk += (q * k[:, kv_of_head]).abs().double().sum((0, 2))
        tokens += q.shape[0] * q.shape[2]
        out = causal_attention(q, k, v, kv_of_head, d.softmax_scale)
        cov.add(out.flatten(2))
        outputs.append(out)
    return AttentionStatistics(cov.sum, qk / tokens, outputs)


def head_scores(stats: AttentionStatistics, o_weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """S[h, :k].sum() = score retained by head h at rank k: the head's Wanda channel score spread
    over its normalised PCA spectrum. Returns the cumulative scores [H, dh + 1] (column 0 = 0)."""
    dh = stats.qk.shape[1]
    channel = stats.covariance.diagonal() * o_weight.double().pow(2).sum(0)
    cumulative = torch.zeros(num_heads, dh + 1, dtype=torch.float64, device=channel.device)
    for h in range(num_heads):
        block = slice(h * dh, (h + 1) * dh)
        values, _ = eigh_descending(stats.covariance[block, block])
        spectrum = values.clamp(min=0) / values.clamp(min=0).sum().clamp(min=1e-30)
        cumulative[h, 1:] = (spectrum * channel[block].sum()).cumsum(0)
    return cumulative


def candidate_shapes(stats: AttentionStatistics, o_weight: torch.Tensor, dims: LayerDims, hidden: int,
                     budget: float, floor: float, options: AttentionOptions) -> list[AttentionShape]:
    """GQA-consistent shapes whose parameters lie in [floor, budget] (the MLP can absorb at most
    budget - floor), best retained score first; if none does, the one nearest to that range."""
    H, G, dh = dims.num_heads, dims.num_kv_heads, dims.head_dim
    group_size = H // G
    cumulative = head_scores(stats, o_weight, H)
    candidates = []
    head_dims = [k for k in options.head_dims if k <= dh and k % 2 == 0] or [dh]
    for k, per_group in product(head_dims, range(1, group_size + 1)):
        # per group: its best `per_group` heads at rank k, and their score
        best_heads, group_score = [], []
        for g in range(G):
            heads = torch.arange(g * group_size, (g + 1) * group_size)
            order = cumulative[heads, k].argsort(descending=True)[:per_group]
            best_heads.append(tuple(sorted(heads[order].tolist())))
            group_score.append(float(cumulative[heads[order], k].sum()))
        group_order = sorted(range(G), key=lambda g: -group_score[g])
        for kept in range(1, G + 1):
            if kept % options.tp_size or (kept * per_group) % options.tp_size:
                continue
            groups = tuple(sorted(group_order[:kept]))
            params = attention_params(hidden, kept * per_group, kept, k)
            score = sum(group_score[g] for g in groups)
            candidates.append((params, score, groups, tuple(best_heads[g] for g in groups), k))
    if not candidates:
        raise ValueError(f"no attention shape has head and KV-head counts divisible by tp size {options.tp_size}")
    fitting = sorted((c for c in candidates if floor - 1e-6 <= c[0] <= budget + 1e-6), key=lambda c: (-c[1], c[0]))
    chosen = fitting or [min(candidates, key=lambda c: max(c[0] - budget, floor - c[0]))]
    return [AttentionShape(groups, heads, k, choose_pairs(stats.qk, heads, k)) for _, _, groups, heads, k in chosen]


def choose_pairs(qk: torch.Tensor, heads, head_dim: int) -> tuple[tuple[int, ...], ...]:
    """Per kept KV group, the head_dim/2 rotate-half pairs with the largest summed mean |q ⊙ k|."""
    half = qk.shape[1] // 2
    pairs = []
    for group_heads in heads:
        pair_score = (qk[list(group_heads), :half] + qk[list(group_heads), half:]).sum(0)
        pairs.append(tuple(sorted(pair_score.argsort(descending=True)[:head_dim // 2].tolist())))
    return tuple(pairs)


@torch.no_grad()
def output_fit(attn: Attention, shape: AttentionShape, inputs: list[torch.Tensor],
               targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram X'^T X' and cross X'^T T of the attention output X' with the kept heads and pairs
    (full-width V) against the target o_proj outputs T."""
    dense_dims, kv_of_head = shape.dense_dims(attn.dims.head_dim), shape.kv_of_head()
    gram, cross = Covariance(), Covariance()
    for x, target in zip(inputs, targets):
        q, key, v = rotated_qkv(attn, x)
        q = torch.stack([q[:, h, :, dense_dims[g]] for h, g in zip(shape.kept_heads(), kv_of_head.tolist())], 1)
        key = torch.stack([key[:, g, :, dense_dims[i]] for i, g in enumerate(shape.kv_groups)], 1)
        out = causal_attention(q, key, v[:, list(shape.kv_groups)], kv_of_head, attn.dims.softmax_scale)
        gram.add(out.flatten(2))
        cross.add(out.flatten(2), target)
    return gram.sum, cross.sum


def block_intra_pca(shape: AttentionShape, gram: torch.Tensor, dense_head_dim: int
                    ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per kept KV group the top-k eigenvectors of its kept heads' summed output covariance (identity
    when the head dim is not cut), and the block-diagonal projection P of all kept heads."""
    dh, k, kv_of_head = dense_head_dim, shape.head_dim, shape.kv_of_head()
    bases = []
    for g in range(len(shape.kv_groups)):
        members = (kv_of_head == g).nonzero().flatten().tolist()
        block = sum(gram[m * dh:(m + 1) * dh, m * dh:(m + 1) * dh] for m in members)
        bases.append(torch.eye(dh, dtype=torch.float64, device=gram.device) if k == dh
                     else eigh_descending(block)[1][:, :k])
    projection = torch.zeros(len(kv_of_head) * dh, len(kv_of_head) * k, dtype=torch.float64, device=gram.device)
    for i, g in enumerate(kv_of_head.tolist()):
        projection[i * dh:(i + 1) * dh, i * k:(i + 1) * k] = bases[g]
    return bases, projection


def fit_error(attn: Attention, shape: AttentionShape, inputs: list[torch.Tensor],
              targets: list[torch.Tensor]) -> float:
    """Squared error of the least-squares o_proj fit for `shape`: ||T||^2 - 2 tr(W^T c) + tr(W^T g W)."""
    gram, cross = output_fit(attn, shape, inputs, targets)
    _, projection = block_intra_pca(shape, gram, attn.dims.head_dim)
    g, c = projection.T @ gram @ projection, projection.T @ cross
    w = least_squares(g, c)
    energy = sum(float(t.double().pow(2).sum()) for t in targets)
    return energy - 2 * float((w * c).sum()) + float((w * (g @ w)).sum())


@torch.no_grad()
def compress_attention(attn: Attention, inputs: list[torch.Tensor], budget: float, floor: float,
                       options: AttentionOptions, targets: list[torch.Tensor] | None = None) -> Attention:
    """A physically smaller `Attention` for normed layer inputs `inputs`, with at most `budget` and
    preferably at least `floor` weights. `targets`: what the o_proj output (without bias) should be,
    per batch; by default the layer's own unpruned output on the same inputs (the paper's target)."""
    dims, config = attn.dims, attn.config
    stats = attention_statistics(attn, inputs)
    if targets is None:
        targets = [out.flatten(2) @ attn.o_proj.weight.T for out in stats.outputs]
    shapes = candidate_shapes(stats, attn.o_proj.weight, dims, config.hidden_size, budget, floor, options)
    if options.select == "error" and len(shapes) > 1:
        # the paper ranks shapes by retained V/O score only, blind to what Q/K pair pruning costs;
        # measuring the fitted output error on a probe subset of the calibration data sees both
        probe = slice(0, PROBE_BATCHES)
        shape = min(shapes[:MAX_PROBED], key=lambda s: fit_error(attn, s, inputs[probe], targets[probe]))
    else:
        shape = shapes[0]
    dh, k = dims.head_dim, shape.head_dim
    dense_dims, kv_of_head, kept_heads = shape.dense_dims(dh), shape.kv_of_head(), torch.tensor(shape.kept_heads())
    gram, cross = output_fit(attn, shape, inputs, targets)
    bases, projection = block_intra_pca(shape, gram, dh)

    o_weight = attn.o_proj.weight.double()
    kept_columns = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in kept_heads.tolist()])
    lossless = k == dh and len(kept_heads) == dims.num_heads
    if options.compensate and not lossless:
        # the paper's Q_t (X ≈ X'P Q_t) folded into o_proj is this direct fit of the o_proj output
        new_o = least_squares(projection.T @ gram @ projection, projection.T @ cross).T
    else:
        new_o = o_weight[:, kept_columns] @ projection

    group_dims = [torch.tensor(list(range(g * dh, (g + 1) * dh)))[dense_dims[i]]
                  for i, g in enumerate(shape.kv_groups)]
    q_rows = torch.cat([torch.arange(h * dh, (h + 1) * dh)[dense_dims[g]]
                        for h, g in zip(kept_heads.tolist(), kv_of_head.tolist())])
    k_rows = torch.cat(group_dims)
    new_dims = LayerDims(len(kept_heads), len(shape.kv_groups), k, dims.intermediate_size, shape.pairs,
                         dims.softmax_scale)
    new = Attention(config, new_dims)
    new.q_proj.weight.copy_(attn.q_proj.weight[q_rows])
    new.k_proj.weight.copy_(attn.k_proj.weight[k_rows])
    v_weight = torch.cat([bases[i].T @ attn.v_proj.weight.double()[g * dh:(g + 1) * dh]
                          for i, g in enumerate(shape.kv_groups)])
    new.v_proj.weight.copy_(v_weight)
    new.o_proj.weight.copy_(new_o)
    if attn.q_proj.bias is not None:
        new.q_proj.bias.copy_(attn.q_proj.bias[q_rows])
        new.k_proj.bias.copy_(attn.k_proj.bias[k_rows])
        new.v_proj.bias.copy_(torch.cat([bases[i].T @ attn.v_proj.bias.double()[g * dh:(g + 1) * dh]
                                         for i, g in enumerate(shape.kv_groups)]))
    if attn.o_proj.bias is not None:
        new.o_proj.bias.copy_(attn.o_proj.bias)
    return new.to(attn.o_proj.weight.device)

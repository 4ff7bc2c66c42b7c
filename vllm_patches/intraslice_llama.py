"""vLLM model class for IntraSlice checkpoints: per-layer heads, KV heads, head dims, MLP widths,
rotary frequencies and softmax scale (docs/checkpoint-format.md).

A thin subclass of vLLM's own `llama.py`. Each decoder layer is built by the stock
`LlamaDecoderLayer` from a per-layer view of the config (the global head/MLP fields replaced by that
layer's values), so the parallel linear layers, the fused QKV/gate-up weight loading, tensor
parallelism and quantized loading are vLLM's. What is overridden:

- rotary: the stock `get_rope` when the layer keeps every dense pair in order (dense layers: the same
  fused kernel as `LlamaForCausalLM`); the stock fused kernel with a gathered cos/sin table when every
  KV group keeps the same pairs; a per-group table (precomputed at start-up) otherwise;
- softmax scale: the checkpoint's (the dense model's), not `head_dim**-0.5`;
- validation before any weight is loaded, and of every checkpoint tensor's shape while loading;
- prefill-only pruning (`pop_skip_layers`, vllm_patches/pop.py): steps with skipped prompt tokens take
  an eager POP forward; all other steps (every decode-only step) run the stock compiled model.

The KV cache needs no change: every layer's `Attention` reports its own `FullAttentionSpec`, and
vLLM's KV-cache manager sums the per-layer page sizes (no padding to the dense size).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers import LlamaConfig

from intraslice.modeling_intraslice import (LayerDims, attention_biases, dense_head_dim, dense_rope, layer_dims,
                                            pop_skip_layers)
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from vllm_patches import pop


class IntraSliceConfigError(ValueError):
    """A checkpoint that cannot be served; the message names the layer or tensor and what was expected."""


# ----------------------------------------------------------------------------------------------------
# Config helpers


def checked_layer_dims(config: LlamaConfig, tp_size: int) -> list[LayerDims]:
    """Per-layer dims, validated for the tensor-parallel size (before anything is built or loaded)."""
    try:
        dims = layer_dims(config)
    except (ValueError, KeyError, TypeError) as error:
        raise IntraSliceConfigError(f"IntraSlice checkpoint: bad intraslice_layers: {error}") from None
    for i, d in enumerate(dims):
        if d.num_heads % tp_size:
            raise IntraSliceConfigError(
                f"IntraSlice checkpoint: layer {i} has {d.num_heads} query heads, not divisible by the "
                f"tensor-parallel size {tp_size}")
        if d.num_kv_heads % tp_size and tp_size % d.num_kv_heads:
            raise IntraSliceConfigError(
                f"IntraSlice checkpoint: layer {i} has {d.num_kv_heads} KV heads; the tensor-parallel size "
                f"{tp_size} must divide it or be a multiple of it")
    return dims


def checked_pop_skip(config: LlamaConfig) -> frozenset[int]:
    """The POP skip set (`pop_skip_layers`, switchable with `--hf-overrides`), validated."""
    try:
        return pop_skip_layers(config)
    except ValueError as error:
        raise IntraSliceConfigError(f"IntraSlice checkpoint: {error}") from None


def layer_config(config: LlamaConfig, dims: LayerDims) -> LlamaConfig:
    """A view of `config` whose global head/MLP fields are one layer's, for the stock layer builders."""
    view = copy.copy(config)
    view.num_attention_heads = dims.num_heads
    view.num_key_value_heads = dims.num_kv_heads
    view.head_dim = dims.head_dim
    view.intermediate_size = dims.intermediate_size
    view.intraslice_dims = dims
    view.dense_config = config  # rotary frequencies come from the dense head_dim
    return view


def supports_head_dim(backend: type, head_dim: int) -> bool:
    """The backend's official head sizes; on CPU also the multiples of 16 its `vec16` kernel runs
    (head_dim 48 is verified against the reference in tests/test_vllm_model.py)."""
    return backend.supports_head_size(head_dim) or (current_platform.is_cpu() and head_dim % 16 == 0
                                                    and head_dim <= 256)


def expected_weight_shapes(config: LlamaConfig, dims: list[LayerDims]) -> dict[str, tuple[int, ...]]:
    """Checkpoint name -> shape of every decoder-layer tensor the format requires."""
    hidden = config.hidden_size
    (qkv_bias, o_bias), mlp_bias = attention_biases(config), getattr(config, "mlp_bias", False)
    shapes = {}
    for i, d in enumerate(dims):
        q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
        layer = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden),
                 "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, q),
                 "mlp.gate_proj": (d.intermediate_size, hidden), "mlp.up_proj": (d.intermediate_size, hidden),
                 "mlp.down_proj": (hidden, d.intermediate_size),
                 "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,)}
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()})
        biases = {"self_attn.q_proj": q, "self_attn.k_proj": kv, "self_attn.v_proj": kv} if qkv_bias else {}
        if o_bias:
            biases["self_attn.o_proj"] = hidden
        if mlp_bias:
            biases.update({"mlp.gate_proj": d.intermediate_size, "mlp.up_proj": d.intermediate_size,
                           "mlp.down_proj": hidden})
        shapes.update({f"model.layers.{i}.{name}.bias": (rows,) for name, rows in biases.items()})
    return shapes


# ----------------------------------------------------------------------------------------------------
# Rotary embeddings of kept pairs


def cos_sin_table(inv_freq: torch.Tensor, max_position: int, attention_scaling: float) -> torch.Tensor:
    """[max_position, ..., 2 * pairs]: cos then sin of position * inv_freq, computed in float64."""
    angles = torch.arange(max_position, dtype=torch.float64).view(-1, *[1] * inv_freq.dim()) * inv_freq.double()
    return (torch.cat((angles.cos(), angles.sin()), dim=-1) * attention_scaling).float()


class GatheredRotaryEmbedding(RotaryEmbedding):
    """Every head uses the same kept frequencies: the stock (fused) rotary op with a gathered table."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_position: int, dtype: torch.dtype):
        head_dim = 2 * inv_freq.numel()
        super().__init__(head_dim, head_dim, max_position, base=0.0, is_neox_style=True, dtype=dtype,
                         init_cache=False)
        self.register_buffer("cos_sin_cache", cos_sin_table(inv_freq, max_position, attention_scaling).to(dtype),
                             persistent=False)


class GroupedRotaryEmbedding(nn.Module):
    """Each KV group keeps its own frequencies: table [max_position, groups, head_dim] built at init;
    the forward is one gather and an elementwise rotate (fused by torch.compile)."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_position: int, dtype: torch.dtype):
        super().__init__()
        self.num_groups, pairs = inv_freq.shape
        self.head_dim = 2 * pairs
        self.register_buffer("cos_sin_cache", cos_sin_table(inv_freq, max_position, attention_scaling).to(dtype),
                             persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cos, sin = self.cos_sin_cache.index_select(0, positions.flatten()).unsqueeze(2).chunk(2, dim=-1)
        return self.rotate(query, cos, sin), None if key is None else self.rotate(key, cos, sin)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [tokens, groups * heads_per_group * head_dim]; cos/sin [tokens, groups, 1, head_dim/2]."""
        shape = x.shape
        x1, x2 = x.reshape(shape[0], self.num_groups, -1, self.head_dim).chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).reshape(shape)


def local_kv_groups(total_kv_heads: int) -> list[int]:
    """The KV groups this tensor-parallel rank holds (vLLM partitions or replicates KV heads)."""
    tp_size, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    if total_kv_heads >= tp_size:
        local = total_kv_heads // tp_size
        return list(range(rank * local, (rank + 1) * local))
    return [rank * total_kv_heads // tp_size]


# ----------------------------------------------------------------------------------------------------
# Model


class IntraSliceAttention(LlamaAttention):
    """`LlamaAttention` sized by the layer's config view; own rotary table and softmax scale."""

    def _init_rotary_emb(self, config: LlamaConfig, quant_config: QuantizationConfig | None) -> None:
        # The stock __init__ calls this after computing `self.scaling` and before building `Attention`
        # with it: the one hook where the checkpoint's scale can replace head_dim**-0.5.
        dims: LayerDims = config.intraslice_dims
        self.scaling = dims.softmax_scale
        groups = [dims.rope_freq_idx[g] for g in local_kv_groups(dims.num_kv_heads)]
        dense = config.dense_config
        dense_pairs = tuple(range(dense_head_dim(dense) // 2))
        if all(group == dense_pairs for group in groups):
            super()._init_rotary_emb(config, quant_config)  # the dense layout: stock rotary
            return
        inv_freq, attention_scaling = dense_rope(dense)
        max_position, dtype = self.max_position_embeddings, torch.get_default_dtype()
        if all(group == groups[0] for group in groups):
            self.rotary_emb = GatheredRotaryEmbedding(inv_freq[list(groups[0])], attention_scaling, max_position,
                                                      dtype)
        else:
            self.rotary_emb = GroupedRotaryEmbedding(inv_freq[torch.tensor(groups)], attention_scaling,
                                                     max_position, dtype)


class IntraSliceDecoderLayer(LlamaDecoderLayer):
    """The stock decoder layer, built from this layer's view of the config."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config: LlamaConfig | None = None,
                 attn_layer_type: type[nn.Module] = IntraSliceAttention) -> None:
        config = config or vllm_config.model_config.hf_config
        dims = layer_dims(config)[extract_layer_index(prefix)]
        super().__init__(vllm_config, prefix, config=layer_config(config, dims), attn_layer_type=attn_layer_type)


class IntraSliceLlamaForCausalLM(LlamaForCausalLM):
    """`LlamaForCausalLM` with per-layer shapes; a dense Llama config gives exactly the stock model."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        dims = checked_layer_dims(config, get_tensor_model_parallel_world_size())
        skip = checked_pop_skip(config)
        if skip and (vllm_config.quant_config is not None or get_pp_group().world_size > 1):
            raise IntraSliceConfigError("IntraSlice: pop_skip_layers needs an unquantized checkpoint and no "
                                        "pipeline parallelism")
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=IntraSliceDecoderLayer)
        self.layer_dims = dims
        self.pop_skip = skip
        self.check_head_dims()
        self.checks_weight_shapes = vllm_config.quant_config is None  # quantized tensors have other shapes
        if skip:
            pop.enable({self.model.layers[i].self_attn.attn.layer_name for i in skip})

    def check_head_dims(self) -> None:
        for i, layer in enumerate(self.model.layers[self.model.start_layer:self.model.end_layer],
                                  start=self.model.start_layer):
            attn = layer.self_attn.attn
            if not supports_head_dim(attn.attn_backend, attn.head_size):
                raise IntraSliceConfigError(
                    f"IntraSlice checkpoint: layer {i} has head_dim {attn.head_size}, which the "
                    f"{attn.attn_backend.get_name()} attention backend does not support (supported: "
                    f"{attn.attn_backend.get_supported_head_sizes()})")

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        step = pop.current_step() if self.pop_skip else None
        if step is None:  # no prompt token skips anything in this step: the stock (compiled) model
            return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)
        return self.pop_forward(input_ids, positions, inputs_embeds, step)

    def pop_forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                    inputs_embeds: torch.Tensor | None, step: pop.PopStep) -> torch.Tensor:
        """`LlamaModel.forward` (one pipeline stage) with the skip-set layers run by POP."""
        hidden_states = inputs_embeds if inputs_embeds is not None else self.model.embed_input_ids(input_ids)
        residual = None
        for i, layer in enumerate(self.model.layers):
            if i in self.pop_skip:
                hidden_states, residual = pop.skipped_layer_forward(layer, positions, hidden_states, residual, step)
            else:
                hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.model.norm(hidden_states, residual)
        return hidden_states

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.checks_weight_shapes:
            expected = expected_weight_shapes(self.config, self.layer_dims)
            seen: set[str] = set()
            loaded = super().load_weights(self.checked_weights(weights, expected, seen))
            missing = sorted(set(expected) - seen)
            if missing:
                raise IntraSliceConfigError(
                    f"IntraSlice checkpoint: {len(missing)} tensor(s) missing, e.g. {missing[0]} "
                    f"(expected shape {list(expected[missing[0]])})")
        else:
            loaded = super().load_weights(weights)
        for i in self.pop_skip:  # before vLLM repacks the CPU weights, which empties qkv_proj.weight
            pop.keep_kv_projection(self.model.layers[i].self_attn)
        return loaded

    @staticmethod
    def checked_weights(weights: Iterable[tuple[str, torch.Tensor]], expected: dict[str, tuple[int, ...]],
                        seen: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name in expected:
                if tuple(tensor.shape) != expected[name]:
                    raise IntraSliceConfigError(
                        f"IntraSlice checkpoint: tensor {name} has shape {list(tensor.shape)}, expected "
                        f"{list(expected[name])} from intraslice_layers")
                seen.add(name)
            yield name, tensor

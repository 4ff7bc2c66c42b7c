"""Prefill-only pruning (POP) inside vLLM: prompt tokens other than each prompt's last one skip the
skip-set layers, where they only write their K/V (methods.md §2, reference:
`IntraSliceLlamaForCausalLM.prefill(..., pop=True)` in intraslice/modeling_intraslice.py).

Which tokens skip: a token is skipped iff `position < prompt_len - 1`, unless its request asked for
prompt logprobs (`prompt_logprobs`, or `echo` with `logprobs`): those are the outputs of the prompt
tokens, which POP would compute with a shallower model, so such a request runs every layer. Kept tokens
are therefore always the last ones of their request's chunk (a non-final prefill chunk keeps none, the
final chunk keeps its last token, decode tokens are always kept), which is what the causal attention
kernels assume when a request's queries are fewer than its new keys. vLLM's attention metadata has no
prompt lengths, so a hook on the model runner's `_build_attention_metadata` (installed only when a POP
checkpoint is served) computes, for real scheduler steps, the kept token indices and the attention
metadata of the kept tokens, built by vLLM's own metadata builders, and publishes them as the current
`PopStep`.

Execution: steps without skipped tokens (every decode-only step) run the normal, compiled model; only
steps with skipped prompt tokens run the POP forward, eagerly (data-dependent shapes), which also
keeps the selection out of torch.compile graphs and CUDA graphs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.v1.attention.backend import CommonAttentionMetadata


@dataclass
class PopStep:
    """What the POP forward needs about the current step."""
    kept: torch.Tensor  # indices of the tokens that run every layer
    metadata: dict[str, object]  # skipped layer's attention name -> attention metadata of the kept tokens


_current: PopStep | None = None
_skipped_attention_names: frozenset[str] = frozenset()


def current_step() -> PopStep | None:
    """The current step's POP data, or None when no token of the step skips a layer."""
    return _current


def enable(skipped_attention_names: set[str]) -> None:
    """Turn POP on in this (worker) process for the attention layers of the skip set."""
    global _skipped_attention_names
    _skipped_attention_names = frozenset(skipped_attention_names)
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # CPU and GPU runners share it

    if not getattr(GPUModelRunner._build_attention_metadata, "intraslice_pop", False):
        GPUModelRunner._build_attention_metadata = _with_pop_step(GPUModelRunner._build_attention_metadata)


def _with_pop_step(build_attention_metadata):
    @functools.wraps(build_attention_metadata)
    def wrapper(runner, num_tokens: int, num_reqs: int, *args, **kwargs):
        global _current
        result = build_attention_metadata(runner, num_tokens, num_reqs, *args, **kwargs)
        # Only real scheduler steps pass `num_scheduled_tokens`; dummy/profiling runs have stale batches.
        real_step = kwargs.get("num_scheduled_tokens") is not None and kwargs.get("ubatch_slices") is None
        _current = _build_step(runner, num_tokens, num_reqs, kwargs["slot_mappings"]) if real_step else None
        return result

    wrapper.intraslice_pop = True
    return wrapper


def _build_step(runner, num_tokens: int, num_reqs: int, slot_mappings: dict[int, torch.Tensor]) -> PopStep | None:
    query_start = runner.query_start_loc.cpu[:num_reqs + 1]
    query_lens = query_start[1:] - query_start[:-1]
    computed = runner.input_batch.num_computed_tokens_cpu_tensor[:num_reqs]
    prompt_lens = runner.input_batch.num_prompt_tokens_cpu_tensor[:num_reqs]
    skipped = torch.minimum((prompt_lens - 1 - computed).clamp(min=0), query_lens)
    if runner.num_prompt_logprobs:  # requests whose prompt tokens' outputs are returned skip nothing
        wants_outputs = [req_id in runner.num_prompt_logprobs for req_id in runner.input_batch.req_ids[:num_reqs]]
        skipped[torch.tensor(wants_outputs)] = 0
    if int(skipped.sum()) == 0:
        return None
    if len(runner.kv_cache_config.kv_cache_groups) != 1:
        raise NotImplementedError("POP needs every layer in one KV-cache group (full attention only)")
    kept_lens = query_lens - skipped
    rows = torch.nonzero(kept_lens).flatten()  # requests with at least one kept token
    request_of_token = torch.repeat_interleave(torch.arange(num_reqs), query_lens)
    offset_in_request = torch.arange(int(query_start[-1])) - query_start[request_of_token]
    kept = torch.nonzero(offset_in_request >= skipped[request_of_token]).flatten()
    device = runner.device
    step = PopStep(kept.to(device), {})
    if not len(rows):
        return step
    kept_start = F.pad(kept_lens[rows].cumsum(0), (1, 0)).to(torch.int32)
    rows_device = rows.to(device)
    common = CommonAttentionMetadata(
        query_start_loc=kept_start.to(device), query_start_loc_cpu=kept_start,
        seq_lens=runner.seq_lens[:num_reqs][rows_device],
        seq_lens_cpu_upper_bound=runner.optimistic_seq_lens_cpu[:num_reqs][rows],
        num_reqs=len(rows), num_actual_tokens=len(kept), max_query_len=int(kept_lens.max()),
        max_seq_len=int(runner.optimistic_seq_lens_cpu[:num_reqs][rows].max()),
        block_table_tensor=runner.input_batch.block_table[0].get_device_tensor(num_reqs)[rows_device],
        slot_mapping=slot_mappings[0][step.kept], causal=True,
        is_prefilling=(computed + query_lens < prompt_lens)[rows].to(device),
        positions=runner.positions[:num_tokens][step.kept])
    for group in runner.attn_groups[0]:
        names = [name for name in group.layer_names if name in _skipped_attention_names]
        if names:
            table = _kernel_block_table(group, common.block_table_tensor)
            metadata = group.get_metadata_builder(0).build(0, replace(common, block_table_tensor=table))
            step.metadata.update(dict.fromkeys(names, metadata))
    return step


def _kernel_block_table(group, block_table: torch.Tensor) -> torch.Tensor:
    """`AttentionGroup.map_to_kernel_block_table` without writing its persistent buffer, which backs the
    full batch's metadata of the same step."""
    if group.kernel_block_size is None:
        return block_table
    blocks_per_kv_block = group.kv_cache_spec.block_size // group.kernel_block_size
    return (block_table.unsqueeze(-1) * (group.kernel_block_stride or blocks_per_kv_block)
            + group.kernel_block_offsets).flatten(1)


def keep_kv_projection(attention: nn.Module) -> None:
    """Copy the K/V rows of the fused QKV weight into buffers `kv_weight`/`kv_bias` of `attention`, for the
    skipped tokens' K/V-only projection. Must run after loading and before vLLM's CPU weight repacking
    (which replaces `qkv_proj.weight`)."""
    q_size = attention.q_size
    weight, bias = attention.qkv_proj.weight, attention.qkv_proj.bias
    attention.register_buffer("kv_weight", weight.detach()[q_size:].clone(), persistent=False)
    attention.register_buffer("kv_bias", None if bias is None else bias.detach()[q_size:].clone(), persistent=False)


def skipped_layer_forward(layer: nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor,
                          residual: torch.Tensor | None, step: PopStep) -> tuple[torch.Tensor, torch.Tensor]:
    """A `LlamaDecoderLayer` step in which only `step.kept` tokens run the layer; every token writes its
    K/V (input norm, K/V projection, RoPE) into the layer's cache. Same (hidden, residual) contract."""
    if residual is None:
        residual = hidden_states
        hidden_states = layer.input_layernorm(hidden_states)
    else:
        hidden_states, residual = layer.input_layernorm(hidden_states, residual)
    attn = layer.self_attn
    key, value = F.linear(hidden_states, attn.kv_weight, attn.kv_bias).split([attn.kv_size, attn.kv_size], dim=-1)
    key = attn.rotary_emb(positions, key.contiguous(), None)[0]
    unified_kv_cache_update(key.view(-1, attn.attn.num_kv_heads, attn.attn.head_size),
                            value.contiguous().view(-1, attn.attn.num_kv_heads, attn.attn.head_size),
                            attn.attn.layer_name)
    output = torch.zeros_like(hidden_states)
    if len(step.kept) == 0:
        return output, residual

    kept = step.kept
    query = attn.qkv_proj(hidden_states[kept])[0][:, :attn.q_size]
    query = attn.rotary_emb(positions[kept], query.contiguous(), None)[0]
    context = get_forward_context().attn_metadata
    full_metadata = context[attn.attn.layer_name]
    context[attn.attn.layer_name] = step.metadata[attn.attn.layer_name]
    try:
        attn_output = attn.attn(query, None, None)  # keys/values: already in the cache
    finally:
        context[attn.attn.layer_name] = full_metadata
    kept_hidden, kept_residual = layer.post_attention_layernorm(attn.o_proj(attn_output)[0], residual[kept])
    output[kept] = layer.mlp(kept_hidden)
    residual = residual.index_copy(0, kept, kept_residual)
    return output, residual

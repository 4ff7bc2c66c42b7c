"""PyTorch reference of the IntraSlice Llama architecture: per-layer heads, KV heads, head dims,
MLP widths and rotary frequencies; optional prefill-only pruning (POP).

This one file is the project's oracle: the compressor evaluates with it, the tests compare vLLM
against it, and `intraslice compress` copies it into every checkpoint so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads a pruned model with only
torch and transformers installed. The checkpoint format is in docs/checkpoint-format.md.

A config without `intraslice_layers` is a dense Llama: this class then computes what
`LlamaForCausalLM` computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


@dataclass(frozen=True)
class LayerDims:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_freq_idx: tuple[tuple[int, ...], ...]  # [kv group][pair] -> index of the dense frequency
    softmax_scale: float

    def to_json(self) -> dict:
        return {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "intermediate_size": self.intermediate_size,
                "rope_freq_idx": [list(group) for group in self.rope_freq_idx],
                "softmax_scale": self.softmax_scale}


def dense_head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def dense_layer_dims(config) -> LayerDims:
    head_dim = dense_head_dim(config)
    pairs = tuple(range(head_dim // 2))
    return LayerDims(config.num_attention_heads, config.num_key_value_heads, head_dim,
                     config.intermediate_size, (pairs,) * config.num_key_value_heads, head_dim ** -0.5)


def layer_dims(config) -> list[LayerDims]:
    """Per-layer dims from `config.intraslice_layers`, or the dense dims of every layer."""
    entries = getattr(config, "intraslice_layers", None)
    if entries is None:
        return [dense_layer_dims(config)] * config.num_hidden_layers
    if len(entries) != config.num_hidden_layers:
        raise ValueError(f"intraslice_layers has {len(entries)} entries, but the model has "
                         f"{config.num_hidden_layers} layers")
    dims = []
    for i, e in enumerate(entries):
        d = LayerDims(e["num_heads"], e["num_kv_heads"], e["head_dim"], e["intermediate_size"],
                      tuple(tuple(group) for group in e["rope_freq_idx"]), e["softmax_scale"])
        problem = (
            "num_heads, num_kv_heads, head_dim and intermediate_size must be >= 1"
            if min(d.num_heads, d.num_kv_heads, d.head_dim, d.intermediate_size) < 1 else
            f"num_heads {d.num_heads} is not a multiple of num_kv_heads {d.num_kv_heads}"
            if d.num_heads % d.num_kv_heads else
            f"head_dim {d.head_dim} is odd" if d.head_dim % 2 else
            f"rope_freq_idx must be {d.num_kv_heads} lists of {d.head_dim // 2} indices below "
            f"{dense_head_dim(config) // 2}"
            if len(d.rope_freq_idx) != d.num_kv_heads or any(
                len(g) != d.head_dim // 2 or min(g) < 0 or max(g) >= dense_head_dim(config) // 2
                for g in d.rope_freq_idx) else None)
        if problem:
            raise ValueError(f"intraslice_layers[{i}]: {problem}")
        dims.append(d)
    return dims


def pop_skip_layers(config) -> frozenset[int]:
    """Validated POP skip set: in range, no duplicates, and not every layer."""
    skip = list(getattr(config, "pop_skip_layers", None) or [])
    n = config.num_hidden_layers
    if any(not isinstance(i, int) or not 0 <= i < n for i in skip):
        raise ValueError(f"pop_skip_layers {skip}: every entry must be a layer index in 0..{n - 1}")
    if len(set(skip)) != len(skip):
        raise ValueError(f"pop_skip_layers {skip} contains duplicates")
    if len(skip) == n:
        raise ValueError("pop_skip_layers contains every layer; at least one layer must run the prompt")
    return frozenset(skip)


def dense_rope(config) -> tuple[torch.Tensor, float]:
    """The dense model's inverse frequencies (rope scaling included) and attention scaling."""
    rope_type = config.rope_parameters["rope_type"]
    init_fn = (LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default"
               else ROPE_INIT_FUNCTIONS[rope_type])
    with torch.device("cpu"):  # also when called under from_pretrained's meta-device context
        inv_freq, attention_scaling = init_fn(config)
    return inv_freq.float(), float(attention_scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, D]; cos/sin: [B, T, heads, D] (already expanded to the heads of x)."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Per-layer keys and values [B, kv_heads, S, D] of the cached positions (`layers`: views into storage
    of `capacity` positions, doubled when full). Token-by-token decoding thus allocates a few sizes per
    layer, or one given the final length, instead of a larger copy at every step, which fragmented the
    heap while sampling calibration text."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.storage: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.capacity = capacity

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.layers[layer]
        start = 0 if cached is None else cached[0].shape[2]
        end = start + k.shape[2]
        storage = self.storage[layer]
        if storage is None or storage[0].shape[2] < end:
            length = max(end, 2 * start, self.capacity)
            storage = tuple(t.new_empty(*t.shape[:2], length, t.shape[3]) for t in (k, v))
            for new, old in zip(storage, cached or ()):
                new[:, :, :start] = old
            self.storage[layer] = storage
        for buffer, new in zip(storage, (k, v)):
            buffer[:, :, start:end] = new
        self.layers[layer] = (storage[0][:, :, :end], storage[1][:, :, :end])
        return self.layers[layer]


def attention_biases(config) -> tuple[bool, bool]:
    """Whether q/k/v_proj and o_proj have biases: `attention_bias` for all four, unless `qkv_bias` (which
    vLLM's Llama reads too: Qwen2's q/k/v biases without an o_proj one) overrides it for q/k/v."""
    bias = getattr(config, "attention_bias", False)
    return getattr(config, "qkv_bias", bias), bias


class Attention(nn.Module):
    def __init__(self, config, dims: LayerDims):
        super().__init__()
        self.config = config
        self.dims = dims
        qkv_bias, bias = attention_biases(config)
        self.q_proj = nn.Linear(config.hidden_size, dims.num_heads * dims.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, dims.num_kv_heads * dims.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, dims.num_kv_heads * dims.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(dims.num_heads * dims.head_dim, config.hidden_size, bias=bias)
        self.register_buffer("inv_freq", torch.empty(dims.num_kv_heads, dims.head_dim // 2), persistent=False)
        self.reset_rope()

    @torch.no_grad()
    def reset_rope(self) -> None:
        """Each kept pair keeps its original frequency: inv_freq is [kv_heads, head_dim/2]."""
        inv_freq, self.attention_scaling = dense_rope(self.config)
        self.inv_freq.copy_(inv_freq[torch.tensor(self.dims.rope_freq_idx)])

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, T, kv_heads, head_dim] for positions [B, T]."""
        angles = positions.double()[..., None, None] * self.inv_freq.double()
        angles = torch.cat([angles, angles], dim=-1)
        return ((angles.cos() * self.attention_scaling).float(), (angles.sin() * self.attention_scaling).float())

    def project_kv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values [B, kv_heads, T, D] of normed hidden states x [B, T, hidden]."""
        B, T, _ = x.shape
        d = self.dims
        cos, sin = self.rope_tables(positions)
        k = apply_rope(self.k_proj(x).view(B, T, d.num_kv_heads, d.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, d.num_kv_heads, d.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def attend(self, x: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_positions: torch.Tensor | None) -> torch.Tensor:
        """Attention output (before o_proj) [B, T, heads*D] of queries from x over keys k/v.
        `key_positions=None`: the keys are the queries' own tokens (plain causal attention)."""
        B, T, _ = x.shape
        d = self.dims
        group = d.num_heads // d.num_kv_heads
        cos, sin = (t.repeat_interleave(group, dim=2) for t in self.rope_tables(positions))
        q = apply_rope(self.q_proj(x).view(B, T, d.num_heads, d.head_dim), cos, sin).transpose(1, 2)
        # Without a cache, is_causal takes SDPA's fast path; with one, queries see keys up to their position.
        mask = None if key_positions is None else key_positions[:, None, None, :] <= positions[:, None, :, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=d.softmax_scale, enable_gqa=True)
        return out.transpose(1, 2).reshape(B, T, d.num_heads * d.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, layer: int,
                key_positions: torch.Tensor | None) -> torch.Tensor:
        k, v = self.project_kv(x, positions)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        return self.o_proj(self.attend(x, positions, k, v, key_positions))


class MLP(nn.Module):
    def __init__(self, config, intermediate_size: int):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, index: int, dims: LayerDims):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, dims)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, dims.intermediate_size)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
                key_positions: torch.Tensor | None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, cache, self.index, key_positions)
        return h + self.mlp(self.post_attention_layernorm(h))

    def write_kv_only(self, h: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """POP's skipped layer: the prompt's K/V still enter this layer's cache; h passes unchanged."""
        k, v = self.self_attn.project_kv(self.input_layernorm(h), positions)
        cache.update(self.index, k, v)
        return h


class IntraSliceLlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dims) for i, dims in enumerate(layer_dims(config)))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                skip_layers: frozenset[int] = frozenset()) -> torch.Tensor:
        """Final hidden states. `positions` default to 0..T-1 after whatever is cached.
        `skip_layers`: layers that only write K/V for these tokens (POP prefill of prompt[:-1])."""
        if positions is None:
            start = 0 if cache is None or cache.layers[0] is None else cache.layers[0][0].shape[2]
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        key_positions = (None if cache is None else
                         torch.arange(int(positions.max()) + 1, device=positions.device).expand(positions.shape[0], -1))
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            if layer.index in skip_layers:
                h = layer.write_kv_only(h, positions, cache)
            else:
                h = layer(h, positions, cache, key_positions)
        return self.norm(h)


class IntraSliceLlamaForCausalLM(PreTrainedModel):
    config_class = LlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    supports_gradient_checkpointing = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = IntraSliceLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Attention):  # from_pretrained builds on the meta device: refill the table
            module.reset_rope()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("the reference model takes unpadded batches only")
        logits = self.logits(self.model(input_ids, positions, cache))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: KVCache, pop: bool = False) -> torch.Tensor:
        """Logits of the last of `input_ids` (a prompt, or one decoded token), appending to `cache`. With
        `pop`, prompt[:-1] skips the config's `pop_skip_layers` (their K/V still written); the last token
        runs every layer."""
        skip = pop_skip_layers(self.config) if pop else frozenset()
        if skip and input_ids.shape[1] > 1:
            self.model(input_ids[:, :-1], cache=cache, skip_layers=skip)
            input_ids = input_ids[:, -1:]
        return self.logits(self.model(input_ids, cache=cache)[:, -1])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of final hidden states, with the head in the weights' own dtype under autocast
        too: autocast's bfloat16 would put a logit near 20 off by up to 0.06, 6% of its probability."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()

    @torch.no_grad()
    def generate_greedy(self, input_ids: torch.Tensor, max_new_tokens: int, pop: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy tokens [B, N] and the log-probabilities of every step [B, N, vocab]."""
        cache = KVCache(self.config.num_hidden_layers)
        logits = self.prefill(input_ids, cache, pop=pop)
        tokens, logprobs = [], []
        for _ in range(max_new_tokens):
            logprobs.append(logits.log_softmax(-1))
            tokens.append(logits.argmax(-1, keepdim=True))
            logits = self.prefill(tokens[-1], cache)
        return torch.cat(tokens, dim=1), torch.stack(logprobs, dim=1)

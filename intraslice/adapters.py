"""Model-family specifics in one place: which architectures the compressor accepts, where a decoder
layer's weights live in the checkpoint, and how to read them one layer at a time.

Supported: the Llama family as transformers writes it (`LlamaForCausalLM`: Llama 2/3/3.x including
Llama-3 rope scaling, SmolLM/SmolLM2, TinyLlama, ...), `MistralForCausalLM` without sliding-window
attention (then it is a Llama), `Phi3ForCausalLM` (Phi-3 and Phi-4 without LongRoPE or partial rotary:
a Llama whose q/k/v and gate/up projections are stored fused), and `Qwen2ForCausalLM` without sliding
windows (a Llama with q/k/v biases and no o_proj bias). Projections `q/k/v/o_proj`, `gate/up/down_proj`,
RMSNorms `input_layernorm`/`post_attention_layernorm`, RoPE in the rotate-half layout (dim j pairs with
j + d/2). Everything downstream reads the Llama layout: `llama_layout` rewrites a family's config (Qwen2's
biases become `qkv_bias`, the key vLLM's Llama reads for them) and `CheckpointWeights` splits fused
tensors on read. Phi-3's `sliding_window` is dropped, as vLLM serves Phi-3: full attention.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import LlamaConfig

from intraslice.io import UserError
from intraslice.modeling_intraslice import dense_head_dim

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM (without sliding window)",
                           "Phi3ForCausalLM (without LongRoPE or partial rotary)",
                           "Qwen2ForCausalLM (without sliding window)")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


def load_llama_config(model_dir: str | Path, allow_pruned: bool = False) -> LlamaConfig:
    """The model's config as a `LlamaConfig`, after checking that the folder holds a supported model."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model folder {model_dir} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{model_dir} has no config.json; expected a Hugging Face model folder")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_file} is not valid JSON: {error}") from None
    architectures = raw.get("architectures") or []
    arch = architectures[0] if architectures else raw.get("model_type", "unknown")
    pruned = arch == "IntraSliceLlamaForCausalLM"
    supported = (arch in ("LlamaForCausalLM", "Phi3ForCausalLM")
                 or (arch == "MistralForCausalLM" and raw.get("sliding_window") is None)
                 or (arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window")))
    if pruned and not allow_pruned:
        raise UserError(f"{model_dir} is already an IntraSlice checkpoint; compress the dense source model instead")
    if not (supported or pruned):
        raise UserError(f"unsupported architecture {arch} in {model_dir}; supported: "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    config = llama_config(raw)
    rope = config.rope_parameters
    if rope["rope_type"] == "longrope":  # its frequencies switch with the sequence length: no static table
        raise UserError(f"{model_dir} uses LongRoPE scaling, which is not supported (its 4k-context variants are)")
    if rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        raise UserError(f"{model_dir} rotates only part of each head (partial_rotary_factor), which is not supported")
    return config


def llama_layout(raw: dict) -> dict:
    """A config.json's fields (dense, pruned, or of a supported family) in the Llama layout: what the
    reference model reads, and what a pruned checkpoint's config starts from."""
    layout = {key: value for key, value in raw.items()
              if key not in ("model_type", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types")}
    if "Qwen2ForCausalLM" in (raw.get("architectures") or []):
        layout.update(attention_bias=False, qkv_bias=True)
    return layout


def llama_config(raw: dict) -> LlamaConfig:
    """A config.json's fields as the reference model's config."""
    return LlamaConfig(**llama_layout(raw))


# Phi-3 stores these projections fused; the Llama names of the parts, in their order along dim 0
FUSED_PROJECTIONS = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                  "self_attn.v_proj.weight"),
                     "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def fused_projection(name: str) -> str | None:
    """The `FUSED_PROJECTIONS` key that checkpoint tensor `name` is, if any."""
    return next((key for key in FUSED_PROJECTIONS if name.endswith("." + key)), None)


def fused_part_rows(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Rows of each part of the fused projections of a dense layer."""
    head_dim = dense_head_dim(config)
    kv_rows = config.num_key_value_heads * head_dim
    return {"self_attn.qkv_proj.weight": (config.num_attention_heads * head_dim, kv_rows, kv_rows),
            "mlp.gate_up_proj.weight": (config.intermediate_size,) * 2}


class CheckpointWeights:
    """Tensors of a safetensors checkpoint (single file or sharded), read by name on demand, so that
    only the tensors in use are resident. Corrupt or truncated files are refused when opened. Fused
    projections (Phi-3) are seen under their Llama names, split on read (`config` gives the sizes).

    Every read opens its file anew: a safetensors handle maps the whole file, and the pages a read
    touches stay resident as long as the handle lives (reading a model layer by layer through one
    handle grew the compressor's memory by the model's size)."""

    def __init__(self, model_dir: str | Path, config: LlamaConfig | None = None):
        path = Path(model_dir)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: path / shard for name, shard in weight_map.items()}
        elif (path / "model.safetensors").is_file():
            files = None
        else:
            raise UserError(f"{model_dir} has no model.safetensors (other weight formats are not supported)")
        fused_rows: dict[str, int] = {}  # rows of each fused tensor, from the headers (no data is read)
        for file in sorted({*files.values()} if files else {path / "model.safetensors"}):
            with open_checked(file) as handle:
                names = list(handle.keys())
                if files is None:
                    files = {name: file for name in names}
                fused_rows.update({name: handle.get_slice(name).get_shape()[0] for name in names
                                   if fused_projection(name)})
        self.files = files
        self.parts: dict[str, tuple[str, int, int]] = {}  # Llama name -> (fused name, first row, end row)
        for name, stored_rows in fused_rows.items():
            if config is None:
                raise ValueError(f"{name} is fused: CheckpointWeights needs the model's config to split it")
            fused = fused_projection(name)
            prefix, start = name[:-len(fused)], 0
            for part, rows in zip(FUSED_PROJECTIONS[fused], fused_part_rows(config)[fused]):
                self.parts[prefix + part] = (name, start, start + rows)
                start += rows
            if stored_rows != start:
                raise UserError(f"{name} has {stored_rows} rows; the config implies {start}")

    def names(self) -> list[str]:
        fused = {name for name, _, _ in self.parts.values()}
        return [name for name in self.files if name not in fused] + list(self.parts)

    def get(self, name: str) -> torch.Tensor:
        return self.read([name])[name]

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors of decoder layer `index`, named relative to the layer."""
        prefix = layer_prefix(index)
        tensors = self.read([name for name in self.names() if name.startswith(prefix)])
        return {name[len(prefix):]: tensor for name, tensor in tensors.items()}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once (a fused tensor read once for all its parts)."""
        stored = list(dict.fromkeys(self.parts[name][0] if name in self.parts else name for name in names))
        missing = [name for name in stored if name not in self.files]
        if missing:
            raise UserError(f"checkpoint has no tensor {missing[0]}")
        tensors = self.read_stored(stored)
        for name in names:
            if name in self.parts:
                fused, start, end = self.parts[name]
                tensors[name] = tensors[fused][start:end].clone()  # its own storage: saved and freed alone
        return {name: tensors[name] for name in names}

    def read_stored(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with open_checked(file) as handle:
                for name in file_names:
                    try:
                        tensors[name] = handle.get_tensor(name)
                    except SafetensorError as error:
                        raise UserError(f"cannot read {name} from {file}: {error}") from None
        return tensors


def open_checked(file: Path):
    """safe_open, which also refuses truncated files (the header must cover the whole file)."""
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{file} is not a readable safetensors file: {error}") from None

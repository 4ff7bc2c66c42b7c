"""Test checkpoints in the pruned-checkpoint format (docs/checkpoint-format.md), written without the
compressor: a tiny random dense Llama, and hand-sliced copies of a dense model with chosen per-layer
dims. The slicing keeps a deterministic random choice of KV groups, query heads, rotary pairs (in a
shuffled order, so that `rope_freq_idx` is not the identity), value dims and MLP channels; quality is
irrelevant, the shapes and the format are what the vLLM tests need.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

import intraslice.modeling_intraslice as reference
from intraslice.io import atomic_output_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """Kept sizes of one layer."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


def copy_tokenizer(source: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)


def write_tiny_llama(out: Path, tokenizer_source: Path, *, num_heads: int, num_kv_heads: int,
                     num_layers: int = 3, seed: int = 0) -> Path:
    """A random dense Llama (hidden 128, head_dim 64) that uses `tokenizer_source`'s tokenizer."""
    base = json.loads((tokenizer_source / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=64, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        bos_token_id=base.get("bos_token_id"), eos_token_id=base.get("eos_token_id"),
        pad_token_id=base.get("pad_token_id"), architectures=["LlamaForCausalLM"], dtype="float32")
    return write_random(out, tokenizer_source, config, reference.IntraSliceLlamaForCausalLM(config), seed)


def write_tiny_family(out: Path, tokenizer_source: Path, family: str, seed: int = 0) -> Path:
    """A random dense Phi-3 (fused qkv_proj and gate_up_proj) or Qwen2 (q/k/v biases, tied head): hidden
    128, 4 query and 2 KV heads of 32 dims, with `tokenizer_source`'s tokenizer."""
    from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class, architecture = {"phi3": (Phi3Config, Phi3ForCausalLM, "Phi3ForCausalLM"),
                                               "qwen2": (Qwen2Config, Qwen2ForCausalLM, "Qwen2ForCausalLM")}[family]
    base = json.loads((tokenizer_source / "config.json").read_text())
    config = config_class(
        vocab_size=base["vocab_size"], hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=family == "qwen2", bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"), pad_token_id=base.get("pad_token_id"), architectures=[architecture],
        dtype="float32")
    with torch.device("meta"):
        model = model_class(config)
    return write_random(out, tokenizer_source, config, model, seed)


def write_random(out: Path, tokenizer_source: Path, config, model: torch.nn.Module, seed: int) -> Path:
    """`model`'s tensors drawn with a large std, so that next-token distributions are peaked (no greedy
    ties), saved with `config` and `tokenizer_source`'s tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            scale = 0.5 if "embed" in name or "lm_head" in name else 0.15
            tensors[name] = torch.randn(param.shape, generator=generator) * scale
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors")
    config.save_pretrained(out)
    copy_tokenizer(tokenizer_source, out)
    return out


def pick(generator: torch.Generator, n: int, k: int) -> torch.Tensor:
    """k distinct indices out of n, sorted."""
    return torch.randperm(n, generator=generator)[:k].sort().values


def slice_layer(tensors: dict[str, torch.Tensor], prefix: str, config: dict, shape: Shape,
                generator: torch.Generator) -> dict:
    """Slice one layer's tensors in place; return its `intraslice_layers` entry."""
    dense_heads, dense_kv, dense_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    per_group, kept_per_group = dense_heads // dense_kv, shape.num_heads // shape.num_kv_heads
    half = shape.head_dim // 2
    groups = pick(generator, dense_kv, shape.num_kv_heads)
    q_rows, kv_qk_rows, v_rows, o_cols, rope_freq_idx = [], [], [], [], []
    for g in groups.tolist():
        pairs = torch.randperm(dense_dim // 2, generator=generator)[:half]  # shuffled: layout order != index order
        qk_dims = torch.cat([pairs, pairs + dense_dim // 2])
        v_dims = pick(generator, dense_dim, shape.head_dim)
        rope_freq_idx.append(pairs.tolist())
        kv_qk_rows.append(g * dense_dim + qk_dims)
        v_rows.append(g * dense_dim + v_dims)
        for h in (g * per_group + pick(generator, per_group, kept_per_group)).tolist():
            q_rows.append(h * dense_dim + qk_dims)
            o_cols.append(h * dense_dim + v_dims)
    channels = pick(generator, config["intermediate_size"], shape.intermediate_size)
    rows = {"q_proj": torch.cat(q_rows), "k_proj": torch.cat(kv_qk_rows), "v_proj": torch.cat(v_rows),
            "gate_proj": channels, "up_proj": channels}
    cols = {"o_proj": torch.cat(o_cols), "down_proj": channels}
    for name in PROJECTIONS:
        module = "self_attn" if name[0] in "qkvo" else "mlp"
        key = f"{prefix}.{module}.{name}.weight"
        tensors[key] = (tensors[key][rows[name]] if name in rows else tensors[key][:, cols[name]]).contiguous()
    return {"num_heads": shape.num_heads, "num_kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
            "intermediate_size": shape.intermediate_size, "rope_freq_idx": rope_freq_idx,
            "softmax_scale": dense_dim ** -0.5}


def write_sliced(source: Path, out: Path, shapes: list[Shape], seed: int = 0,
                 pop_skip_layers: list[int] | None = None) -> Path:
    """A hand-sliced copy of the dense checkpoint `source` with per-layer `shapes`."""
    config = json.loads((source / "config.json").read_text())
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    if len(shapes) != config["num_hidden_layers"]:
        raise ValueError(f"{len(shapes)} shapes for {config['num_hidden_layers']} layers")
    tensors = load_file(source / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    config["intraslice_layers"] = [slice_layer(tensors, f"model.layers.{i}", config, shape, generator)
                                   for i, shape in enumerate(shapes)]
    config["architectures"] = ["IntraSliceLlamaForCausalLM"]
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_intraslice.IntraSliceLlamaForCausalLM"}
    config["pop_skip_layers"] = pop_skip_layers or []
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(reference.__file__, out / "modeling_intraslice.py")
    copy_tokenizer(source, out)
    return out


def decoder_params(model_dir: Path) -> int:
    """Parameters of the decoder layers (everything but embeddings, final norm and LM head)."""
    return sum(t.numel() for name, t in load_file(model_dir / "model.safetensors").items()
               if name.startswith("model.layers."))


# Five layer shapes of the example model (dense: 9 heads / 3 KV heads, head_dim 64, MLP 1536), cycled
# over the 30 layers: non-uniform heads, KV heads, head dims (incl. 48, the CPU kernel's vec16 path)
# and MLP widths, about 30% fewer decoder parameters.
EXAMPLE_SHAPES = (Shape(9, 3, 64, 1280), Shape(6, 3, 48, 1024), Shape(6, 2, 64, 1024),
                  Shape(3, 1, 64, 1024), Shape(9, 3, 32, 1152))


def example_pruned_shapes(num_layers: int = 30) -> list[Shape]:
    return [EXAMPLE_SHAPES[i % len(EXAMPLE_SHAPES)] for i in range(num_layers)]


def cached_checkpoint(cache: Path, name: str, build: Callable[[Path], object]) -> Path:
    """`cache/name-<hash>`, built once by `build(folder)`; the hash of this file and of the reference
    model invalidates checkpoints written by older slicing code."""
    code = Path(__file__).read_bytes() + Path(reference.__file__).read_bytes()
    path = cache / f"{name}-{hashlib.sha256(code).hexdigest()[:10]}"
    if not (path / "config.json").is_file():
        with atomic_output_dir(path, overwrite=True) as tmp:
            build(tmp)
    return path

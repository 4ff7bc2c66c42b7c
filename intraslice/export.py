"""Write a pruned checkpoint (docs/checkpoint-format.md) into an already-created (temporary) folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

import intraslice.modeling_intraslice as reference
from intraslice.modeling_intraslice import LayerDims

ARCHITECTURE = "IntraSliceLlamaForCausalLM"
AUTO_MAP = {"AutoModelForCausalLM": "modeling_intraslice.IntraSliceLlamaForCausalLM"}
SHARD_BYTES = 4 * 1024 ** 3
# Everything a user needs besides weights and config: tokenizer, chat template, generation config.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                "generation_config.json")


def pruned_config(source_config: dict, dims: list[LayerDims], pop_skip: list[int]) -> dict:
    """The source config (in the Llama layout, `adapters.llama_layout`) with the dense global fields
    untouched, plus the per-layer entries."""
    config = {key: value for key, value in source_config.items() if key != "auto_map"}
    config.update(model_type="llama", architectures=[ARCHITECTURE], auto_map=AUTO_MAP,
                  intraslice_layers=[d.to_json() for d in dims], pop_skip_layers=list(pop_skip))
    return config


def write_checkpoint(out: Path, source_dir: Path, config: dict, tensors: dict[str, torch.Tensor],
                     report: dict) -> None:
    """Weights (sharded above 4 GiB), config, the reference model file, tokenizer files, report."""
    save_sharded(out, tensors)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(reference.__file__, out / "modeling_intraslice.py")
    for name in COPIED_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out / name)
    (out / "intraslice_report.json").write_text(json.dumps(report, indent=2) + "\n")


def save_sharded(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor.contiguous()
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

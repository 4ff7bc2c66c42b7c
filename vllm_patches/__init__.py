"""vLLM plugin: serves IntraSlice checkpoints (per-layer heads, head dims, MLP widths, POP).

vLLM calls `register()` through the `vllm.general_plugins` entry point in every process (API server,
engine core, workers), so `vllm serve ./pruned` needs no extra flag.
"""

ARCHITECTURE = "IntraSliceLlamaForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # A lazy "module:Class" string keeps vLLM's start-up from importing the model code early.
        ModelRegistry.register_model(ARCHITECTURE, "vllm_patches.intraslice_llama:IntraSliceLlamaForCausalLM")

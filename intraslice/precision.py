"""Where the compressor computes in bfloat16: the decoder passes of the distillation, which only need
good gradients (`--autocast`). Everything that defines the result stays exact: covariances and
eigendecompositions (float64), the Fisher scores, the teacher's targets, the logits of every pass
(`IntraSliceLlamaForCausalLM.logits`), the loss, the keep-or-drop check and the perplexities (float32).

Measured on the example model (docs/results.md): the bfloat16 distillation gave the same held-out
perplexities as float32 to 0.06% in 15% less time. Sampling calibration text from the dense model is
left in float32: under bfloat16 it drew text that cost the pruned model 4% on the King James Bible at
R = 0.3, but so did two other float32 draws of the same seed, so whether bfloat16 costs anything there
is not known.
"""
from __future__ import annotations

from contextlib import AbstractContextManager

import torch


def fast_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 natively (AVX512-BF16 or AMX CPUs, Ampere+ GPUs); elsewhere
    bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, check, lambda: False)()
                   for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def use_bfloat16(choice: str, device: torch.device) -> bool:
    """`--autocast`: auto uses bfloat16 where the device is fast at it."""
    return choice == "bfloat16" or (choice == "auto" and fast_bfloat16(device))


def bfloat16_autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

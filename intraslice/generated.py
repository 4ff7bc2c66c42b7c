"""Calibration text sampled from the dense model itself.

A pruned model is judged on text the calibration never saw. Samples drawn from the model's own
distribution (each from a random first token, then plain sampling at temperature 1, as in LLM-QAT's
data-free calibration) cover what the model has learned to predict, not one corpus's domain; mixed with
real text they make the least-squares folds and channel choices generalise beyond that text.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from intraslice.modeling_intraslice import IntraSliceLlamaForCausalLM, KVCache


@torch.no_grad()
def sample_token_windows(model: IntraSliceLlamaForCausalLM, num_samples: int, seq_len: int, seed: int,
                         vocab_size: int, batch_size: int = 16) -> torch.LongTensor:
    """`num_samples` sequences [N, seq_len] sampled from `model`, each from a uniformly random token
    below `vocab_size` (the tokenizer's real vocabulary, not the embedding's padding)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    samples = []
    progress = tqdm(total=num_samples * (seq_len - 1), desc="calibration: sampling from the model", unit="tok")
    for start in range(0, num_samples, batch_size):
        count = min(batch_size, num_samples - start)
        tokens = [torch.randint(0, vocab_size, (count, 1), generator=generator)]
        cache = KVCache(model.config.num_hidden_layers)
        logits = model.prefill(tokens[0].to(device), cache)
        for _ in range(seq_len - 1):
            probs = logits.softmax(-1).cpu()
            tokens.append(torch.multinomial(probs, 1, generator=generator))
            logits = model.prefill(tokens[-1].to(device), cache)
            progress.update(count)
        samples.append(torch.cat(tokens, dim=1))
    progress.close()
    return torch.cat(samples)

"""Calibration text sampled from the dense model itself.

A pruned model is judged on text the calibration never saw. Samples drawn from the model's own
distribution (each from a random first token, then plain sampling at temperature 1, as in LLM-QAT's
data-free calibration) cover what the model has learned to predict, not one corpus's domain; mixed with
real text they make the least-squares folds and channel choices generalise beyond that text.

Each calibration window is packed from several independent pieces, as pretraining packs documents:
more random starts cover more of the distribution, and short pieces decode in fewer, wider steps.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from intraslice.heap import release_free_memory
from intraslice.modeling_intraslice import IntraSliceLlamaForCausalLM, KVCache


@torch.no_grad()
def sample_token_windows(model: IntraSliceLlamaForCausalLM, num_samples: int, seq_len: int, seed: int,
                         vocab_size: int, piece_len: int = 128, batch_size: int = 32) -> torch.LongTensor:
    """`num_samples` windows [N, seq_len], each packed from pieces of `piece_len` tokens sampled from
    `model`, every piece from a uniformly random token below `vocab_size` (the tokenizer's real
    vocabulary, not the embedding's padding). `batch_size` pieces decode at once; their KV cache is the
    compressor's largest allocation besides the model (0.19 GB for the example model's 32 x 128 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    piece_len = min(piece_len, seq_len)
    pieces_per_window = -(-seq_len // piece_len)
    num_pieces = num_samples * pieces_per_window
    pieces = []
    progress = tqdm(total=num_pieces * piece_len, desc="calibration: sampling from the model", unit="tok")
    for start in range(0, num_pieces, batch_size):
        count = min(batch_size, num_pieces - start)
        tokens = [torch.randint(0, vocab_size, (count, 1), generator=generator)]
        cache = KVCache(model.config.num_hidden_layers)
        logits = model.prefill(tokens[0].to(device), cache)
        progress.update(count)
        for _ in range(piece_len - 1):
            probs = logits.softmax(-1).cpu()
            tokens.append(torch.multinomial(probs, 1, generator=generator))
            logits = model.prefill(tokens[-1].to(device), cache)
            release_free_memory()  # each step's short-lived tensors would otherwise fragment the heap
            progress.update(count)
        pieces.append(torch.cat(tokens, dim=1))
    progress.close()
    return torch.cat(pieces).view(num_samples, -1)[:, :seq_len]

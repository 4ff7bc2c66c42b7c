"""Perplexity of any checkpoint (dense Llama-family or IntraSlice) with the reference model."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from transformers import LlamaConfig

from intraslice.adapters import CheckpointWeights, layer_prefix, load_llama_config
from intraslice.calibration import positions_for
from intraslice.modeling_intraslice import Attention, IntraSliceLlamaForCausalLM


def load_reference_model(model_dir: str | Path, device: str = "cpu") -> IntraSliceLlamaForCausalLM:
    """A dense or pruned checkpoint in the reference model, float32, after checking its files."""
    config = load_llama_config(model_dir, allow_pruned=True)
    return assemble_model(config, CheckpointWeights(model_dir, config), device=device)


def assemble_model(config: LlamaConfig, weights: CheckpointWeights,
                   layer_tensors: dict[str, torch.Tensor] | None = None,
                   device: str = "cpu") -> IntraSliceLlamaForCausalLM:
    """The reference model (float32, eval mode) for `config` with the tensors of `weights`, read in the
    Llama layout whatever the checkpoint's (fused projections split), or with `layer_tensors` (the
    compressor's pruned layers) in place of its decoder layers."""
    with torch.device("meta"):  # weights of its own would be a second, randomly initialised model
        model = IntraSliceLlamaForCausalLM(config)
    if layer_tensors is None:
        layer_tensors = {layer_prefix(index) + name: tensor.float() for index in range(config.num_hidden_layers)
                         for name, tensor in weights.layer(index).items()}
    state = dict(layer_tensors)
    for name in weights.names():
        if not name.startswith("model.layers."):
            state[name] = weights.get(name).float()
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)  # the given tensors themselves: no second copy
    for module in model.modules():
        if isinstance(module, Attention):  # the rotary table is a buffer, not in the state
            module.inv_freq = torch.empty(module.inv_freq.shape)
            module.reset_rope()
    return model.to(device).eval()


# Positions whose logits exist at once: 25 MB each way for a 49k vocabulary. 32 took a distillation step
# 0.3 s longer on 2 CPU cores: the head streamed from memory four times as often.
LOSS_CHUNK = 128


def next_token_nll(model: IntraSliceLlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of samples `ids` [B, T] (each from position 0)."""
    hidden, targets = model.model(ids)[:, :-1], ids[:, 1:]
    return sum(chunk_nll(model.lm_head, hidden[:, span], targets[:, span]) for span in chunk_spans(targets.shape[1]))


def backward_mean_nll(model: IntraSliceLlamaForCausalLM, hidden: torch.Tensor, ids: torch.Tensor) -> None:
    """Back-propagate the mean next-token NLL of `ids` [B, T] from their final (normed) hidden states
    `hidden`, one chunk of positions at a time (`backward_in_chunks`)."""
    count = ids[:, 1:].numel()
    backward_in_chunks(hidden[:, :-1], lambda h, span: chunk_nll(model.lm_head, h, ids[:, 1:][:, span]) / count)


def backward_in_chunks(hidden: torch.Tensor, chunk_loss: Callable[[torch.Tensor, slice], torch.Tensor]) -> None:
    """Back-propagate the sum of `chunk_loss(hidden[:, span], span)` over spans of LOSS_CHUNK positions:
    each chunk's logits, softmax and their gradients exist only during its own backward pass
    (checkpointed chunks summed into one loss peaked 0.2 GB higher for a 512-token sample)."""
    detached = hidden.detach().requires_grad_(True)
    for span in chunk_spans(hidden.shape[1]):
        chunk_loss(detached[:, span], span).backward()
    hidden.backward(detached.grad)


def chunk_spans(length: int, size: int = LOSS_CHUNK) -> list[slice]:
    """Consecutive spans of at most `size` positions covering `length`."""
    return [slice(start, start + size) for start in range(0, length, size)]


def backward_layer_by_layer(model: IntraSliceLlamaForCausalLM, ids: torch.Tensor,
                            backward_head: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Gradients of a loss on the final normed hidden states of `ids` [B, T] (`backward_head` back-
    propagates it), checkpointed by hand: a forward without gradients keeps only each decoder layer's
    input, then each layer is re-run with gradients, from the last to the first. Only one layer's
    activations exist at once, and every layer's come and go in the same sizes, so the heap reuses them
    (transformers' per-layer checkpointing interleaves saved inputs with freed activations, and glibc's
    heap grew by up to 0.9 GB in one sample's pass). The embeddings get no gradient. Returns the final
    normed hidden states (detached), the model's output on the way."""
    positions = positions_for(ids)
    with torch.no_grad():
        inputs = [model.model.embed_tokens(ids)]
        for layer in model.model.layers:
            inputs.append(layer(inputs[-1], positions, None, None))
    h = inputs.pop().requires_grad_(True)
    output = model.model.norm(h)
    backward_head(output)
    grad = h.grad
    for layer in reversed(model.model.layers):
        x = inputs.pop().requires_grad_(True)
        layer(x, positions, None, None).backward(grad)
        grad = x.grad
    return output.detach()


def chunk_nll(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(lm_head(hidden).float().flatten(0, 1), targets.flatten(), reduction="sum")


@torch.no_grad()
def perplexity(model: IntraSliceLlamaForCausalLM, tokens: torch.Tensor, batch_size: int = 2,
               desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over every position of every sample [N, T] (each sample from position 0)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(tokens.split(batch_size), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        total += float(next_token_nll(model, batch))
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def evaluate_dir(model_dir: str | Path, source: str | None, num_samples: int, seq_len: int, seed: int = 0,
                 split: str = "evaluation", text_field: str = "text", device: str = "cpu") -> dict:
    """Perplexity of a checkpoint on `num_samples` x `seq_len` tokens of `split` of `source`."""
    from transformers import AutoTokenizer

    from intraslice.data import describe_source, load_token_samples

    model = load_reference_model(model_dir, device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = load_token_samples(tokenizer, source, num_samples, seq_len, seed, split, text_field)
    return {"model": str(model_dir), "text": describe_source(source), "split": split, "samples": num_samples,
            "seq_len": seq_len, "perplexity": perplexity(model, tokens)}

"""Calibration text drawn from the dense model itself, of two kinds.

Samples: a pruned model is judged on text the calibration never saw. Samples drawn from the model's own
distribution (each from a random first token, then plain sampling at temperature 1, as in LLM-QAT's
data-free calibration) cover what the model has learned to predict, not one corpus's domain; mixed with
real text they make the least-squares folds and channel choices generalise beyond that text. Each
window is packed from several independent pieces, as pretraining packs documents: more random starts
cover more of the distribution, and short pieces decode in fewer, wider steps. From random first
tokens the model writes mostly modern web text, chat and code; by default every piece
(`--opening-share`) starts instead from one of the openings of many kinds of writing
(`register_openings.txt`: fiction, history, treatises, verse, drama, sermons, letters, law, news,
recipes, diaries, proofs, and a dozen of technical documentation, code and chat, which stand in for
what the random starts wrote), so that older and literary registers are covered too without losing
the modern ones (docs/results.md).

Statements: prose rarely asks for a fact, so the MLP channels that recall facts would go first
(docs/results.md#factual-recall). The model's own greedy one-sentence completions of openings such as
"The capital of Peru is" or "Lagos is a city in" (`knowledge_openings.txt`: the countries and languages
of ISO 3166 and 639 and the cities of the time-zone database, written by
benchmarks/knowledge_openings.py) make the calibration ask for what the model knows. They are its
beliefs, right or wrong: what the pruned model should keep.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from intraslice.heap import release_free_memory
from intraslice.modeling_intraslice import IntraSliceLlamaForCausalLM, KVCache

KNOWLEDGE_OPENINGS = Path(__file__).with_name("knowledge_openings.txt")
REGISTER_OPENINGS = Path(__file__).with_name("register_openings.txt")


@torch.no_grad()
def sample_token_windows(model: IntraSliceLlamaForCausalLM, num_samples: int, seq_len: int, seed: int,
                         vocab_size: int, openings: Sequence[list[int]] = (), piece_len: int = 128,
                         batch_size: int = 64) -> torch.LongTensor:
    """`num_samples` windows [N, seq_len], each packed from pieces of `piece_len` tokens sampled from
    `model`, every piece from a uniformly random token below `vocab_size` (the tokenizer's real
    vocabulary, not the embedding's padding) or, given `openings` (token ids), from the next opening in
    a seeded order, repeated in reshuffled rounds. `batch_size` pieces decode at once: each step reads
    every weight once, so wider steps cost less per token (the example model on 2 CPU cores: 6.1 ms at
    32 rows, 4.5 at 64, 3.6 at 128), but their KV cache is the sampler's largest allocation besides the
    model (0.38 GB for the example model's 64 x 128 tokens; at 128 the sampler would set the run's peak
    memory). The width and the draw (`draw_tokens`) decide which samples a seed gives, and one draw moves
    the pruned model on unseen text by up to 4% (docs/results.md)."""
    generator = torch.Generator().manual_seed(seed)
    piece_len = min(piece_len, seq_len)
    pieces_per_window = -(-seq_len // piece_len)
    num_pieces = num_samples * pieces_per_window
    prompts = [opening[:piece_len - 1] for opening in seeded_rounds(openings, num_pieces, seed)]
    pieces = []
    desc = "calibration: sampling from the model" + (" (openings)" if openings else "")
    with tqdm(total=num_pieces * piece_len, desc=desc, unit="tok") as progress:
        for start in range(0, num_pieces, batch_size):
            count = min(batch_size, num_pieces - start)
            batch = (prompts[start:start + count] if openings
                     else torch.randint(0, vocab_size, (count, 1), generator=generator).tolist())
            pieces.append(decode_after_prompts(
                model, batch, piece_len,
                lambda logits: draw_tokens(logits.softmax(-1), generator), progress))
    return torch.cat(pieces).view(num_samples, -1)[:, :seq_len]


def draw_tokens(probs: torch.Tensor, generator: torch.Generator) -> torch.LongTensor:
    """One token per row of `probs` [B, vocab] (on the CPU), by inverting the cumulative distribution
    at one uniform draw per row. `torch.multinomial` draws from the same distribution through an
    exponential variate for every entry, sequentially: 36 ms for 32 x 49k on 2 CPU cores, against 7
    here; it took a fifth of each of the sampler's decoding steps."""
    cdf = probs.double().cumsum(-1)
    uniform = torch.rand(len(probs), 1, generator=generator, dtype=torch.float64)
    return torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(1)  # never a token of probability 0


def register_openings(tokenizer) -> list[list[int]]:
    """The token ids of each opening in `register_openings.txt`."""
    return [tokenizer(line).input_ids for line in REGISTER_OPENINGS.read_text().splitlines() if line]


def seeded_rounds(items: Sequence, count: int, seed: int) -> list:
    """`count` items in rounds over `items`, each round in a fresh seeded order."""
    rng, order = random.Random(seed), []
    while items and len(order) < count:
        round_ = list(items)
        rng.shuffle(round_)
        order += round_
    return order[:count]


@torch.no_grad()
def statement_windows(model: IntraSliceLlamaForCausalLM, tokenizer, num_samples: int, seq_len: int, seed: int,
                      max_tokens: int = 20, batch_size: int = 128) -> torch.LongTensor:
    """`num_samples` windows [N, seq_len] packed from the model's statements: the openings in a seeded
    order, each with its greedy completion up to the end of its first sentence, until they fill the
    windows (in reshuffled repeats if all the openings do not)."""
    rng = random.Random(seed)
    openings = KNOWLEDGE_OPENINGS.read_text().splitlines()
    rng.shuffle(openings)
    needed = num_samples * seq_len
    statements, tokens = [], 0
    with tqdm(total=needed, desc="calibration: the model's statements", unit="tok") as progress:
        for start in range(0, len(openings), batch_size):
            for statement in greedy_statements(model, tokenizer, openings[start:start + batch_size], max_tokens):
                statements.append(tokenizer(" " + statement, add_special_tokens=False).input_ids)
                tokens += len(statements[-1])
                progress.update(len(statements[-1]))
            if tokens >= needed:
                break
    stream = []
    while len(stream) < needed:  # shuffled: every window mixes kinds of statement
        rng.shuffle(statements)
        stream += [token for statement in statements for token in statement]
    return torch.tensor(stream[:needed], dtype=torch.long).view(num_samples, seq_len)


def greedy_statements(model: IntraSliceLlamaForCausalLM, tokenizer, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt with its greedy completion, cut after the first sentence."""
    ids = [tokenizer(prompt).input_ids for prompt in prompts]
    tokens = decode_after_prompts(model, ids, max(map(len, ids)) + max_tokens, lambda logits: logits.argmax(-1))
    return [prompt + first_sentence(tokenizer.decode(row[len(i):len(i) + max_tokens], skip_special_tokens=True))
            for prompt, i, row in zip(prompts, ids, tokens.tolist())]


def first_sentence(text: str) -> str:
    line = text.split("\n")[0]
    return line[:line.index(".") + 1] if "." in line else line


def decode_after_prompts(model: IntraSliceLlamaForCausalLM, prompts: Sequence[list[int]], length: int,
                         choose: Callable[[torch.Tensor], torch.LongTensor], progress: tqdm | None = None
                         ) -> torch.LongTensor:
    """Rows [B, length]: each prompt (token ids) followed by the tokens `choose` picks from the last
    position's logits [B, vocab]. Prompts of any length decode in one batch: each row is fed its own
    prompt's tokens until they run out (the reference model takes no padding), then its choices."""
    lengths = torch.tensor([len(prompt) for prompt in prompts])
    shortest = int(lengths.min())
    forced = torch.tensor([list(prompt) + [0] * (length - len(prompt)) for prompt in prompts])

    def next_token(logits: torch.Tensor, position: int) -> torch.LongTensor:
        return torch.where(position < lengths, forced[:, position], choose(logits)).unsqueeze(1)

    if progress is not None:
        progress.update(shortest * len(prompts))
    return extend(model, forced[:, :shortest], length - shortest, next_token, progress)


def extend(model: IntraSliceLlamaForCausalLM, prompts: torch.LongTensor, new_tokens: int,
           next_token: Callable[[torch.Tensor, int], torch.LongTensor], progress: tqdm | None = None
           ) -> torch.LongTensor:
    """`prompts` [B, L] followed by `new_tokens` tokens, each picked by `next_token` from the last
    position's logits [B, vocab] (on the CPU, where the seeded generators live) and its position."""
    device = next(model.parameters()).device
    cache = KVCache(model.config.num_hidden_layers, capacity=prompts.shape[1] + new_tokens)
    tokens = [prompts]
    logits = model.prefill(prompts.to(device), cache)
    for step in range(new_tokens):
        tokens.append(next_token(logits.cpu(), prompts.shape[1] + step))
        if step < new_tokens - 1:
            logits = model.prefill(tokens[-1].to(device), cache)
        release_free_memory()  # each step's short-lived tensors would otherwise fragment the heap
        if progress is not None:
            progress.update(len(prompts))
    return torch.cat(tokens, dim=1)

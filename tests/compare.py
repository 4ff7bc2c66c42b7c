"""Greedy generations from a real vLLM server (official openai client) and from the PyTorch reference
model, and their comparison: greedy tokens equal, max |logprob difference| below a tolerance."""
from __future__ import annotations

import pydoc_data.topics
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from openai import OpenAI
from transformers import AutoConfig, AutoTokenizer

from intraslice.modeling_intraslice import IntraSliceLlamaForCausalLM

LOGPROB_TOLERANCE = 1e-3  # float32 vLLM vs float32 reference (the bar)
SHORT_TEXTS = ("The capital of France is", "def fibonacci(n):", "A list of three primary colors: red,",
               "Once upon a time, in a small village by the sea,")


@dataclass(frozen=True)
class Greedy:
    tokens: list[int]
    logprobs: list[float]  # log-probability of each generated token


def comparison_prompts(model_dir: Path, long_tokens: int = 1100) -> list[list[int]]:
    """Token ids of the short texts and of one long Python-documentation text of `long_tokens` tokens."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    long_text = " ".join(pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)[:20])
    long_ids = tokenizer(long_text).input_ids[:long_tokens]
    assert len(long_ids) == long_tokens
    return [tokenizer(text).input_ids for text in SHORT_TEXTS] + [long_ids]


def served_greedy(client: OpenAI, prompt: list[int], max_tokens: int) -> Greedy:
    model = client.models.list().data[0].id
    response = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         logprobs=1, extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = response.choices[0]
    return Greedy(list(choice.token_ids), list(choice.logprobs.token_logprobs))


def served_greedy_concurrent(client: OpenAI, prompts: list[list[int]], max_tokens: int) -> list[Greedy]:
    """All prompts in flight at once, so that vLLM batches prefills of different lengths with decodes."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: served_greedy(client, p, max_tokens), prompts))


def load_reference(model_dir: Path, **config_overrides) -> IntraSliceLlamaForCausalLM:
    """The reference model of `model_dir` in float32, with config values replaced as by `--hf-overrides`."""
    config = AutoConfig.from_pretrained(model_dir)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    return IntraSliceLlamaForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()


def reference_greedy(model: IntraSliceLlamaForCausalLM, prompt: list[int], max_tokens: int,
                     pop: bool = False) -> Greedy:
    tokens, logprobs = model.generate_greedy(torch.tensor([prompt]), max_tokens, pop=pop)
    tokens = tokens[0]
    return Greedy(tokens.tolist(), logprobs[0].gather(-1, tokens[:, None])[:, 0].tolist())


def max_logprob_diff(a: Greedy, b: Greedy) -> float:
    return max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True))


def assert_same_greedy(served: Greedy, expected: Greedy, tolerance: float = LOGPROB_TOLERANCE) -> None:
    assert served.tokens == expected.tokens
    assert max_logprob_diff(served, expected) < tolerance

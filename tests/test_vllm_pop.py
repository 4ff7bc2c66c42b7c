"""Prefill-only pruning (POP) in vLLM equals the reference POP (`prefill(..., pop=True)`): dense and
pruned checkpoints, chunked prefill mixed with other requests' decodes, eager and torch.compile.
With an empty skip set the model is the one without POP: test_vllm_model.py serves the pruned
checkpoint (`pop_skip_layers: []`) against the non-POP reference."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from openai import OpenAI
from transformers import LlamaConfig

from compare import (LOGPROB_TOLERANCE, assert_same_greedy, load_reference, max_logprob_diff, reference_greedy,
                     served_greedy, served_greedy_concurrent)

MAX_TOKENS = 12
SKIP = list(range(19, 29))  # one third of the 30 layers: the deepest but the last
POP_OVERRIDES = ("--hf-overrides", json.dumps({"pop_skip_layers": SKIP}))
DENSE_POP_OVERRIDES = ("--hf-overrides", json.dumps({"pop_skip_layers": SKIP,
                                                     "architectures": ["IntraSliceLlamaForCausalLM"]}))
CHUNKED = ("--max-num-batched-tokens", "256")


def reference_pop(model_dir: Path, prompts: list[list[int]]) -> list:
    model = load_reference(model_dir, pop_skip_layers=SKIP)
    return [reference_greedy(model, prompt, MAX_TOKENS, pop=True) for prompt in prompts]


@pytest.fixture(scope="module")
def pruned_pop_reference(pruned_example_dir, prompts) -> list:
    return reference_pop(pruned_example_dir, prompts)


def test_reference_pop_changes_outputs_and_empty_skip_set_does_not(pruned_example_dir, prompts,
                                                                    pruned_pop_reference):
    """Guards the tests below: POP must make a measurable difference, or they could not fail."""
    model = load_reference(pruned_example_dir, pop_skip_layers=[])
    long_prompt = prompts[-1]
    without = reference_greedy(model, long_prompt, MAX_TOKENS)
    assert reference_greedy(model, long_prompt, MAX_TOKENS, pop=True) == without
    assert max_logprob_diff(pruned_pop_reference[-1], without) > 1e-2


def test_skip_set_validation_names_the_problem():
    from vllm_patches.intraslice_llama import IntraSliceConfigError, checked_pop_skip

    config = LlamaConfig(num_hidden_layers=3)
    for skip, message in (([3], r"every entry must be a layer index in 0..2"), ([1, 1], "contains duplicates"),
                          ([0, 1, 2], "contains every layer")):
        config.pop_skip_layers = skip
        with pytest.raises(IntraSliceConfigError, match=message):
            checked_pop_skip(config)
    config.pop_skip_layers = [2, 0]
    assert checked_pop_skip(config) == {0, 2}


@pytest.mark.integration
def test_dense_pop_equals_reference_chunked_eager(vllm_server, example_model_dir, prompts):
    expected = reference_pop(example_model_dir, prompts)
    server = vllm_server(example_model_dir, "--enforce-eager", *CHUNKED, *DENSE_POP_OVERRIDES)
    client = OpenAI(base_url=server.url + "/v1", api_key="EMPTY")
    for prompt, want in zip(prompts, expected):
        assert_same_greedy(served_greedy(client, prompt, MAX_TOKENS), want)
    # All at once: the long prompt's chunks share steps with the short prompts' last tokens and decodes.
    for served, want in zip(served_greedy_concurrent(client, prompts, MAX_TOKENS), expected):
        assert_same_greedy(served, want)


@pytest.mark.integration
def test_pruned_pop_equals_reference_compiled(vllm_server, pruned_example_dir, prompts, pruned_pop_reference):
    """The default torch.compile mode (the only compiled server of the suite): decode steps run the
    compiled pruned model, steps with skipped prompt tokens the POP forward."""
    client = OpenAI(base_url=vllm_server(pruned_example_dir, *POP_OVERRIDES).url + "/v1", api_key="EMPTY")
    for served, expected in zip(served_greedy_concurrent(client, prompts, MAX_TOKENS), pruned_pop_reference):
        assert_same_greedy(served, expected)


@pytest.mark.integration
def test_prompt_logprobs_come_from_every_layer(vllm_server, pruned_example_dir, prompts, pruned_pop_reference):
    """A request for its prompt's logprobs (echo, as perplexity and lm-eval clients send) gets the full
    model's, not a shallower model's; the requests batched with it still skip."""
    client = OpenAI(base_url=vllm_server(pruned_example_dir, *POP_OVERRIDES).url + "/v1", api_key="EMPTY")
    model = client.models.list().data[0].id
    prompt = prompts[-1]
    with torch.no_grad():
        logits = load_reference(pruned_example_dir, pop_skip_layers=[])(torch.tensor([prompt])).logits[0, :-1]
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
    with ThreadPoolExecutor(1) as pool:
        echoed = pool.submit(client.completions.create, model=model, prompt=prompt, max_tokens=1, temperature=0,
                             echo=True, logprobs=1)
        batched = served_greedy_concurrent(client, prompts, MAX_TOKENS)
        served = echoed.result().choices[0].logprobs.token_logprobs[1:len(prompt)]
    assert max(abs(a - b) for a, b in zip(served, expected, strict=True)) < LOGPROB_TOLERANCE
    for got, want in zip(batched, pruned_pop_reference):
        assert_same_greedy(got, want)

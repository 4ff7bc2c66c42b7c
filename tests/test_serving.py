"""The example model served by real vLLM (stock LlamaForCausalLM) through the official openai client."""
from __future__ import annotations

import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.integration

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "A list of three primary colors: red,",
    "Once upon a time, in a small village by the sea,",
]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def client(vllm_server, example_model_dir) -> OpenAI:
    server = vllm_server(example_model_dir, "--enforce-eager")
    return OpenAI(base_url=server.url + "/v1", api_key="EMPTY")


@pytest.fixture(scope="module")
def model_name(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def transformers_greedy(example_model_dir) -> dict[str, list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(example_model_dir)
    model = AutoModelForCausalLM.from_pretrained(example_model_dir, dtype=torch.float32)
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        out[prompt] = generated[0, ids.shape[1]:].tolist()
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_transformers(client, model_name, transformers_greedy, prompt):
    response = client.completions.create(model=model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"return_token_ids": True, "ignore_eos": True})
    expected = transformers_greedy[prompt]
    assert response.choices[0].token_ids[:len(expected)] == expected


def test_completion_answers_paris(client, model_name):
    response = client.completions.create(model=model_name, prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
    assert "Paris" in response.choices[0].text
    assert response.usage.completion_tokens > 0


def test_chat_completion_uses_chat_template(client, model_name):
    response = client.chat.completions.create(
        model=model_name, temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason in ("stop", "length")


def test_streaming_matches_non_streaming(client, model_name):
    prompt = PROMPTS[3]
    full = client.completions.create(model=model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.completions.create(model=model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_streaming_chat(client, model_name):
    stream = client.chat.completions.create(model=model_name, temperature=0, max_tokens=24, stream=True,
                                            messages=[{"role": "user", "content": "Name a color."}])
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) > 2 and "".join(pieces).strip()

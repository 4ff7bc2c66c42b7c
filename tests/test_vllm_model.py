"""The plugin's `IntraSliceLlamaForCausalLM` served by real vLLM: dense equals the stock class, pruned
checkpoints equal the PyTorch reference, the OpenAI API works end to end, bad checkpoints fail early.

Servers are shared through the `vllm_server` fixture; tests are ordered by server configuration.
These servers run eager (fast start-up); the default torch.compile mode is covered by
tests/test_vllm_pop.py, whose compiled server runs the pruned model for every decode step.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from openai import OpenAI
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from checkpoints import Shape, cached_checkpoint, decoder_params, write_sliced, write_tiny_family, write_tiny_llama
from compare import (assert_same_greedy, load_reference, reference_greedy, served_greedy,
                     served_greedy_concurrent)
from conftest import CACHE
from intraslice.compress_options import CompressOptions
from intraslice.compressor import compress
from serving.server import ServerError, VllmServer

MAX_TOKENS = 12
EAGER = "--enforce-eager"
PLUGIN_ARCH = '{"architectures": ["IntraSliceLlamaForCausalLM"]}'
# Small enough that the 1100-token prompt is prefilled in 5 chunks, mixed with other requests' decodes.
CHUNKED = ("--max-num-batched-tokens", "256")


def kv_cache_tokens(server: VllmServer) -> int:
    """KV-cache tokens vLLM allocated, from its start-up log."""
    match = re.search(r"KV cache size: ([\d,]+) tokens", server.log_path.read_text(errors="replace"))
    assert match, "no KV cache size line in the server log"
    return int(match.group(1).replace(",", ""))


def client_of(server: VllmServer) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="EMPTY")


@pytest.fixture(scope="module")
def pruned_reference(pruned_example_dir, prompts) -> list:
    model = load_reference(pruned_example_dir)
    return [reference_greedy(model, prompt, MAX_TOKENS) for prompt in prompts]


def test_pruned_example_checkpoint_is_irregular_and_30_percent_smaller(example_model_dir, pruned_example_dir):
    config = json.loads((pruned_example_dir / "config.json").read_text())
    layers = config["intraslice_layers"]
    assert len({(e["num_heads"], e["num_kv_heads"], e["head_dim"], e["intermediate_size"]) for e in layers}) == 5
    assert any(group != sorted(group) for e in layers for group in e["rope_freq_idx"])
    assert 0.65 < decoder_params(pruned_example_dir) / decoder_params(example_model_dir) < 0.75


# --- dense: the plugin class equals vLLM's built-in LlamaForCausalLM --------------------------------

@pytest.mark.integration
def test_dense_through_plugin_equals_stock_llama(vllm_server, example_model_dir, prompts):
    stock_server = vllm_server(example_model_dir, EAGER)
    stock = [served_greedy(client_of(stock_server), p, MAX_TOKENS) for p in prompts]
    stock_kv_tokens = kv_cache_tokens(stock_server)
    plugin_server = vllm_server(example_model_dir, EAGER, "--hf-overrides", PLUGIN_ARCH)
    assert "Resolved architecture: IntraSliceLlamaForCausalLM" in plugin_server.log_path.read_text()
    for served, expected in zip([served_greedy(client_of(plugin_server), p, MAX_TOKENS) for p in prompts], stock):
        assert_same_greedy(served, expected, tolerance=1e-5)
    assert kv_cache_tokens(plugin_server) == stock_kv_tokens


# --- the pruned example model vs the PyTorch reference (chunked prefill server) ---------------------

@pytest.fixture(scope="module")
def pruned_server(vllm_server, pruned_example_dir) -> VllmServer:
    return vllm_server(pruned_example_dir, EAGER, *CHUNKED)


@pytest.mark.integration
def test_pruned_greedy_and_logprobs_equal_reference(pruned_server, prompts, pruned_reference):
    assert len(prompts[-1]) > 1000  # prefilled in chunks of 256 tokens
    for prompt, expected in zip(prompts, pruned_reference):
        assert_same_greedy(served_greedy(client_of(pruned_server), prompt, MAX_TOKENS), expected)


@pytest.mark.integration
def test_pruned_concurrent_requests_equal_reference(pruned_server, prompts, pruned_reference):
    for served, expected in zip(served_greedy_concurrent(client_of(pruned_server), prompts, MAX_TOKENS),
                                pruned_reference):
        assert_same_greedy(served, expected)


@pytest.mark.integration
def test_pruned_kv_cache_holds_more_tokens(pruned_server, example_model_dir, pruned_example_dir):
    """Per-layer KV sizes are summed, not padded to the dense size: the same 2 GiB hold more tokens."""
    def kv_bytes_per_token(model_dir: Path) -> int:
        config = LlamaConfig.from_pretrained(model_dir)
        entries = getattr(config, "intraslice_layers", None) or [
            {"num_kv_heads": config.num_key_value_heads, "head_dim": config.head_dim}] * config.num_hidden_layers
        return sum(2 * e["num_kv_heads"] * e["head_dim"] * 4 for e in entries)  # K and V, float32

    tokens = kv_cache_tokens(pruned_server)
    expected = 2 * 1024 ** 3 // kv_bytes_per_token(pruned_example_dir)
    assert abs(tokens - expected) / expected < 0.01
    assert tokens > 1.4 * 2 * 1024 ** 3 // kv_bytes_per_token(example_model_dir)


@pytest.fixture(scope="module")
def openai_client(pruned_server) -> OpenAI:
    return client_of(pruned_server)


@pytest.mark.integration
def test_openai_completion_with_top_logprobs(openai_client, pruned_example_dir):
    model = openai_client.models.list().data[0].id
    response = openai_client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                                temperature=0, logprobs=5)
    choice = response.choices[0]
    assert choice.text and response.usage.completion_tokens == 8
    for token_logprob, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert len(top) == 5 and token_logprob == pytest.approx(max(top.values()))


@pytest.mark.integration
def test_openai_chat_equals_reference(openai_client, pruned_example_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Name a color of the sky."}]
    prompt = AutoTokenizer.from_pretrained(pruned_example_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = reference_greedy(load_reference(pruned_example_dir), list(prompt), MAX_TOKENS)
    model = openai_client.models.list().data[0].id
    response = openai_client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, logprobs=True,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = response.choices[0]
    assert response.prompt_token_ids == list(prompt)
    assert_same_greedy(type(expected)(list(choice.token_ids), [t.logprob for t in choice.logprobs.content]),
                       expected)


@pytest.mark.integration
def test_openai_streaming_equals_non_streaming(openai_client):
    model = openai_client.models.list().data[0].id
    kwargs = dict(model=model, max_tokens=16, temperature=0,
                  messages=[{"role": "user", "content": "Write one sentence about the sea."}])
    whole = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = [c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(**kwargs, stream=True)
              if c.choices]
    assert len(chunks) > 2 and "".join(chunks) == whole


# --- tiny random MHA and GQA configs, hand-sliced ---------------------------------------------------

TINY_SHAPES = [Shape(4, 2, 64, 256), Shape(2, 1, 32, 128), Shape(4, 2, 48, 192)]


@pytest.fixture(scope="module")
def tiny_dirs(example_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Sliced tiny random models: MHA (4/4 heads) and GQA (4/2 heads), head_dim 64; and a tiny random
    Phi-3 (fused projections) and Qwen2 (q/k/v biases), pruned by the compressor itself, attention included."""
    def build(num_kv_heads: int, shapes: list[Shape]):
        def write(out: Path) -> None:
            dense = write_tiny_llama(out / "dense", example_model_dir, num_heads=4, num_kv_heads=num_kv_heads)
            write_sliced(dense, out / "pruned", shapes)
        return cached_checkpoint(CACHE, f"test-tiny-{num_kv_heads}kv", write) / "pruned"

    mha_shapes = [Shape(4, 4, 64, 256), Shape(2, 2, 32, 128), Shape(3, 3, 48, 192)]
    dirs = {"mha": build(4, mha_shapes), "gqa": build(2, TINY_SHAPES)}
    for family in ("phi3", "qwen2"):
        folder = tmp_path_factory.mktemp(family)
        compress(write_tiny_family(folder / "dense", example_model_dir, family), folder / "pruned", CompressOptions(
            ratio=0.3, attention_share=None, head_dims=(32,), samples=4, seq_len=64, allocation_samples=4,
            group_size=2, eval_samples=0, distill_steps=2))
        dirs[family] = folder / "pruned"
    return dirs


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["mha", "gqa", "phi3", "qwen2"])
def test_tiny_random_pruned_equals_reference(vllm_server, tiny_dirs, prompts, kind):
    model = load_reference(tiny_dirs[kind])
    client = client_of(vllm_server(tiny_dirs[kind], EAGER, *CHUNKED))
    expected = [reference_greedy(model, prompt, MAX_TOKENS) for prompt in prompts]
    for served, want in zip(served_greedy_concurrent(client, prompts, MAX_TOKENS), expected):
        assert_same_greedy(served, want)


# --- bad checkpoints: a clear error before serving starts -------------------------------------------

def broken_copy(source: Path, out: Path, edit_config=None, edit_tensors=None) -> Path:
    shutil.copytree(source, out)
    if edit_config:
        config = json.loads((out / "config.json").read_text())
        edit_config(config)
        (out / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "model.safetensors")
    return out


def start_fails_with(model_dir: Path, message: str) -> None:
    server = VllmServer(model_dir, extra_args=[EAGER], startup_timeout=300)
    with pytest.raises(ServerError):
        server.start()
    assert message in server.log_path.read_text(errors="replace")


@pytest.mark.integration
def test_server_refuses_missing_tensor(tiny_dirs, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    broken = broken_copy(tiny_dirs["gqa"], tmp_path / "missing", edit_tensors=lambda t: t.pop(name))
    start_fails_with(broken, f"tensor(s) missing, e.g. {name} (expected shape [128, 128])")


def test_head_dims_follow_the_attention_backend():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm_patches.intraslice_llama import supports_head_dim

    assert all(supports_head_dim(CPUAttentionBackend, d) for d in (32, 48, 64, 128))
    assert not any(supports_head_dim(CPUAttentionBackend, d) for d in (8, 40, 72))


def test_validation_names_layer_for_bad_lists():
    from vllm_patches.intraslice_llama import IntraSliceConfigError, checked_layer_dims

    entry = {"num_heads": 3, "num_kv_heads": 1, "head_dim": 32, "intermediate_size": 64,
             "rope_freq_idx": [list(range(16))], "softmax_scale": 0.125}
    config = LlamaConfig(hidden_size=64, num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                         num_hidden_layers=2, intraslice_layers=[entry])
    with pytest.raises(IntraSliceConfigError, match="intraslice_layers has 1 entries, but the model has 2 layers"):
        checked_layer_dims(config, tp_size=1)
    config.intraslice_layers = [entry, {**entry, "rope_freq_idx": [list(range(15))]}]
    with pytest.raises(IntraSliceConfigError, match=r"intraslice_layers\[1\]: rope_freq_idx must be 1 lists of 16"):
        checked_layer_dims(config, tp_size=1)
    config.intraslice_layers = [entry, entry]
    assert len(checked_layer_dims(config, tp_size=1)) == 2
    with pytest.raises(IntraSliceConfigError, match="layer 0 has 3 query heads, not divisible by the "
                                                    "tensor-parallel size 2"):
        checked_layer_dims(config, tp_size=2)


def test_validation_names_tensor_of_wrong_shape():
    from vllm_patches.intraslice_llama import IntraSliceConfigError, IntraSliceLlamaForCausalLM

    expected = {"model.layers.3.self_attn.k_proj.weight": (128, 576)}
    weights = [("model.embed_tokens.weight", torch.zeros(10, 576)),
               ("model.layers.3.self_attn.k_proj.weight", torch.zeros(192, 576))]
    checked = IntraSliceLlamaForCausalLM.checked_weights(weights, expected, set())
    assert next(checked)[0] == "model.embed_tokens.weight"
    with pytest.raises(IntraSliceConfigError, match=r"tensor model.layers.3.self_attn.k_proj.weight has shape "
                                                    r"\[192, 576\], expected \[128, 576\]"):
        next(checked)

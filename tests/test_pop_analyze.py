"""POP importance analysis, skip-set choice and writing, and the reference POP's semantics."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from intraslice import pop
from intraslice.cli import main
from intraslice.io import UserError
from intraslice.modeling_intraslice import IntraSliceLlamaForCausalLM, KVCache, pop_skip_layers


def tiny_pruned_model(**config_overrides) -> IntraSliceLlamaForCausalLM:
    """4 layers of irregular (pruned) dims, so the analysis meets what the compressor writes."""
    dense_head_dim = 12
    layers = [(4, 2, 12, 64), (2, 1, 8, 32), (4, 2, 10, 48), (3, 1, 12, 16)]  # heads, kv heads, head_dim, MLP
    config = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=dense_head_dim, max_position_embeddings=128, tie_word_embeddings=False,
        initializer_range=0.2, architectures=["IntraSliceLlamaForCausalLM"],
        intraslice_layers=[{"num_heads": h, "num_kv_heads": kv, "head_dim": d, "intermediate_size": m,
                            "rope_freq_idx": [list(range(dense_head_dim // 2 - d // 2, dense_head_dim // 2))] * kv,
                            "softmax_scale": dense_head_dim ** -0.5} for h, kv, d, m in layers],
        **config_overrides)
    torch.manual_seed(0)
    return IntraSliceLlamaForCausalLM(config).eval()


def random_ids(num_samples: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, 97, (num_samples, seq_len), generator=torch.Generator().manual_seed(1))


def test_importance_has_one_finite_value_per_layer_and_stage():
    model = tiny_pruned_model()
    importance = pop.layer_importance(model, random_ids(6, 10), batch_size=4)
    for values in (importance.prefill, importance.decode):
        assert values.shape == (4,) and values.dtype == torch.float64
        assert torch.isfinite(values).all() and (values >= 0).all()
    # The last layer's context outputs feed nothing (only the predicted position is scored): exactly 0.
    assert importance.prefill[-1] == 0
    assert (importance.prefill[:-1] > 0).all() and (importance.decode > 0).all()
    assert all(p.requires_grad for p in model.parameters())  # the analysis leaves the model as it was


def test_virtual_gates_at_zero_are_exactly_the_reference_pop():
    """Context gates 0 on the skip set reproduce `prefill(pop=True)`: the importance measures POP itself.
    The skipped layers' K/V equal their own projections of the unchanged hidden state."""
    model = tiny_pruned_model(pop_skip_layers=[1, 2])
    ids = random_ids(2, 9)
    cache = KVCache(4)
    pop_logits = model.prefill(ids, cache, pop=True)

    layer_inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda layer, args: layer_inputs.__setitem__(layer.index, args[0]))
             for layer in model.model.layers]
    context_gates = torch.tensor([[1.0, 0.0, 0.0, 1.0]] * 2)
    with torch.no_grad(), pop.virtual_gates(model, context_gates, torch.ones(2, 4)):
        gated_logits = model.lm_head(model.model(ids)[:, -1]).float()
    for hook in hooks:
        hook.remove()

    torch.testing.assert_close(gated_logits, pop_logits, rtol=0, atol=1e-5)
    assert torch.equal(layer_inputs[2][:, :-1], layer_inputs[1][:, :-1])  # skipped: context h unchanged
    positions = torch.arange(9).expand(2, -1)
    for index in (1, 2):
        layer = model.model.layers[index]
        k, v = layer.self_attn.project_kv(layer.input_layernorm(layer_inputs[index]), positions)
        torch.testing.assert_close(cache.layers[index][0], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.layers[index][1], v, rtol=1e-5, atol=1e-5)


def test_reference_pop_with_empty_skip_set_equals_no_pop():
    ids = random_ids(2, 7)
    model = tiny_pruned_model(pop_skip_layers=[])
    tokens, logprobs = model.generate_greedy(ids, 4, pop=False)
    pop_tokens, pop_logprobs = model.generate_greedy(ids, 4, pop=True)
    assert torch.equal(tokens, pop_tokens) and torch.equal(logprobs, pop_logprobs)
    model.config.pop_skip_layers = [2]  # and a non-empty skip set does change the result
    assert not torch.equal(model.generate_greedy(ids, 4, pop=True)[1], logprobs)


def test_cached_decoding_equals_the_full_forward():
    """Prefill, then one token at a time through the cache (its storage doubles three times, 3 -> 24):
    every step's logits equal the uncached causal forward's at that position."""
    model = tiny_pruned_model()
    ids = random_ids(2, 13)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(4)
        steps = [model.prefill(ids[:, :3], cache)] + [model.prefill(ids[:, i:i + 1], cache) for i in range(3, 13)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 2:], rtol=1e-5, atol=1e-5)
    assert cache.storage[0][0].shape[2] == 24 and cache.layers[0][0].shape[2] == 13


def test_skip_count_follows_the_fraction_and_never_takes_every_layer():
    assert [pop.skip_count(30, f) for f in (0, 0.2, 1 / 3, 0.5)] == [0, 6, 10, 15]
    assert pop.skip_count(4, 0.99) == 3
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(UserError, match="fraction"):
            pop.skip_count(30, bad)


def test_select_layers_strategies():
    importance = torch.tensor([5.0, 1.0, 3.0, 0.5, 0.2, 4.0, 0.1, 0.0], dtype=torch.float64)
    assert pop.select_layers(importance, 3, "lowest") == [4, 6, 7]
    assert pop.select_layers(importance, 3, "contiguous") == [2, 3, 4]  # block sums 9, 4.5, 3.7, 4.7, 4.3, 4.1
    assert pop.select_layers(importance, 3, "last") == [5, 6, 7]
    assert all(pop.select_layers(importance, 0, s) == [] for s in pop.STRATEGIES)
    for strategy in pop.STRATEGIES:
        chosen = pop.select_layers(importance, 7, strategy)
        assert len(set(chosen)) == 7 and all(0 <= i < 8 for i in chosen)
    with pytest.raises(ValueError):
        pop.select_layers(importance, 8, "lowest")


@pytest.fixture()
def tiny_checkpoint(tmp_path) -> Path:
    model = tiny_pruned_model()
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]  # as a dense Llama folder has it
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    return tmp_path / "ckpt"


def test_write_skip_set_round_trip(tiny_checkpoint, capsys):
    before = json.loads((tiny_checkpoint / "config.json").read_text())
    assert main(["pop-analyze", str(tiny_checkpoint), "--layers", "3,1", "--write"]) == 0
    after = json.loads((tiny_checkpoint / "config.json").read_text())
    assert after.pop("pop_skip_layers") == [1, 3]
    assert after.pop("architectures") == ["IntraSliceLlamaForCausalLM"]
    before.pop("architectures")
    assert after == before
    assert sorted(p.name for p in tiny_checkpoint.iterdir() if p.name.startswith(".")) == []  # no temp files
    reloaded = IntraSliceLlamaForCausalLM.from_pretrained(tiny_checkpoint)
    assert pop_skip_layers(reloaded.config) == {1, 3}
    assert pop.write_skip_set(tiny_checkpoint, []) == []  # turning POP off again
    assert json.loads((tiny_checkpoint / "config.json").read_text())["pop_skip_layers"] == []


@pytest.mark.parametrize("args, message", [
    (["--layers", "0,4"], "layer index in 0..3"),
    (["--layers", "1,1"], "duplicates"),
    (["--layers", "0,1,2,3"], "every layer"),
    (["--layers", "1,x"], "comma-separated"),
    (["--fraction", "1"], "fraction"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_the_config(tiny_checkpoint, capsys, args, message):
    config_before = (tiny_checkpoint / "config.json").read_bytes()
    assert main(["pop-analyze", str(tiny_checkpoint), *args, "--write"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert (tiny_checkpoint / "config.json").read_bytes() == config_before
    assert not (tiny_checkpoint / pop.ANALYSIS_FILE).exists()


def test_missing_folder_and_foreign_architecture_are_user_errors(tmp_path, capsys):
    assert main(["pop-analyze", str(tmp_path / "nope"), "--layers", "1", "--write"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "num_hidden_layers": 4}))
    with pytest.raises(UserError, match="GPT2LMHeadModel"):
        pop.write_skip_set(tmp_path, [1])


@pytest.mark.integration
def test_pop_analyze_on_the_example_model(example_model_dir, tmp_path, capsys):
    """The whole command on the real model (small calibration), then the library API agrees with it."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for item in example_model_dir.iterdir():  # share the weights; config.json is the file --write replaces
        os.symlink(item, model_dir / item.name)
    (model_dir / "config.json").unlink()
    (model_dir / "config.json").write_text((example_model_dir / "config.json").read_text())
    args = ["--samples", "8", "--seq-len", "32", "--fraction", "0.2"]
    assert main(["pop-analyze", str(model_dir), *args, "--write"]) == 0
    out = capsys.readouterr().out
    report = json.loads((model_dir / pop.ANALYSIS_FILE).read_text())
    assert len(report["importance"]) == 30 and len(report["skip_layers"]) == 6
    assert report["importance"][-1]["prefill"] == 0 and report["importance"][-1]["decode"] > 0
    assert f"skip set (contiguous, 6 of 30 layers): {report['skip_layers']}" in out
    config = json.loads((model_dir / "config.json").read_text())
    assert config["pop_skip_layers"] == report["skip_layers"]
    assert config["architectures"] == ["IntraSliceLlamaForCausalLM"]
    assert json.loads((example_model_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert pop.choose_skip_set(model_dir, 0.2, num_samples=8, seq_len=32) == report["skip_layers"]

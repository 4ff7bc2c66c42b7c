"""Self-distillation after compression: the top-k KL, the low-rank updates and their merge, the
layer-by-layer backward, and that the compressor's distillation moves the pruned model towards dense."""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from intraslice.compress_options import CompressOptions
from intraslice.compressor import compress
from intraslice.data import load_token_samples
from intraslice.distill import LowRankUpdates, chunk_losses, distill, teacher_targets, top_k_kl
from intraslice.evaluate import backward_in_chunks, backward_layer_by_layer, load_reference_model
from test_compress import FAST, build_tiny_llama


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", 6, 2, hidden=96)


@pytest.fixture(scope="module")
def tiny_sharp(tiny_gqa, tmp_path_factory):
    """The tiny model saved with the sharpened final norm (see `sharpened`)."""
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("sharp") / "model"
    model = LlamaForCausalLM.from_pretrained(tiny_gqa, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(30)
    model.save_pretrained(out)
    shutil.copy(tiny_gqa / "tokenizer.json", out)
    shutil.copy(tiny_gqa / "tokenizer_config.json", out)
    return out


def test_top_k_kl_is_the_full_kl_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 5, 50), torch.randn(2, 5, 50)
    log_p = F.log_softmax(teacher, -1)
    log_q = F.log_softmax(student, -1)
    full = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    everything = log_p.topk(50, -1)
    assert torch.allclose(top_k_kl(log_q, everything.values, everything.indices), full, rtol=1e-5)
    top = log_p.topk(8, -1)
    coarse = top_k_kl(log_q, top.values, top.indices)
    assert 0 < coarse < full  # merging outcomes never raises a KL divergence
    assert abs(top_k_kl(log_p, top.values, top.indices)) < 1e-5


def test_chunk_losses_add_the_weighted_nll_of_the_samples_own_next_tokens():
    torch.manual_seed(0)
    sample = torch.randint(0, 50, (1, 10))
    logits = torch.randn(1, 10, 50)
    top = F.log_softmax(torch.randn(1, 10, 50), -1).topk(8, -1)
    span = slice(4, 10)  # the last chunk: its last position has no next token
    kl, loss = chunk_losses(logits[:, span], top.values, top.indices, sample, span, text_weight=0.5)
    assert torch.allclose(kl, top_k_kl(F.log_softmax(logits[:, span], -1), top.values[:, span], top.indices[:, span]))
    nll = F.cross_entropy(logits[0, 4:9], sample[0, 5:10], reduction="sum")
    assert torch.allclose(loss, kl + 0.5 * nll)
    assert torch.equal(chunk_losses(logits[:, span], top.values, top.indices, sample, span, 0.0)[1], kl)


def test_teacher_targets_reuse_the_fisher_pass_hidden_states_exactly(tiny_gqa):
    from intraslice.allocation import fisher_statistics

    model = sharpened(tiny_gqa)
    samples = torch.randint(0, 300, (5, 24))
    stats = fisher_statistics(model, samples[:3], group_size=2, labels="sampled")
    reused = teacher_targets(model, samples, k=8, known_hidden=stats.final_hidden)
    fresh = teacher_targets(model, samples, k=8)
    assert torch.equal(reused.tokens, fresh.tokens)
    assert torch.equal(reused.log_probs, fresh.log_probs)
    wrong = teacher_targets(model, samples, k=8, known_hidden=torch.zeros_like(stats.final_hidden))
    assert not torch.allclose(wrong.log_probs[:3], fresh.log_probs[:3])  # the known states are used
    assert torch.equal(wrong.log_probs[3:], fresh.log_probs[3:])


def test_low_rank_updates_merge_into_the_same_model(tiny_gqa):
    model = load_reference_model(tiny_gqa)
    ids = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        dense = model(ids).logits
        updates = LowRankUpdates(model, rank=4, generator=torch.Generator().manual_seed(0))
        assert torch.equal(model(ids).logits, dense)  # B = 0: training starts from the compressed model
        for _, _, b in updates.updates:
            b.normal_(0, 0.05)
        hooked = model(ids).logits
        updates.remove()
        assert torch.equal(model(ids).logits, dense)
        updates.merge()
        merged = model(ids).logits
    assert (hooked - dense).abs().max() > 1e-2
    assert (merged - hooked).abs().max() < 1e-4
    assert not any(module._forward_hooks for module in model.modules())


def test_layer_by_layer_backward_equals_autograd_through_the_model(tiny_gqa):
    model = load_reference_model(tiny_gqa)
    ids = torch.randint(0, 300, (1, 40))
    targets = torch.randint(0, 300, (1, 40))

    def loss(hidden: torch.Tensor, span: slice) -> torch.Tensor:
        return F.cross_entropy(model.lm_head(hidden).flatten(0, 1), targets[:, span].flatten(), reduction="sum")

    model.zero_grad()
    loss(model.model(ids), slice(None)).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if "layers" in name}
    model.zero_grad()
    backward_layer_by_layer(model, ids, lambda hidden: backward_in_chunks(hidden, loss))
    for name, grad in expected.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-5), name


def sharpened(folder):
    """The random model with a 30x larger final norm: peaked next-token distributions, as trained
    models have (the random ones are almost uniform)."""
    model = load_reference_model(folder)
    with torch.no_grad():
        model.model.norm.weight.mul_(30)
    return model


@pytest.mark.parametrize("bfloat16", [False, True])
def test_distillation_lowers_the_kl_to_the_teacher(tiny_gqa, bfloat16):
    teacher = sharpened(tiny_gqa)
    samples = torch.randint(0, 300, (4, 32))
    targets = teacher_targets(teacher, samples, k=16)
    assert targets.log_probs.shape == targets.tokens.shape == (4, 32, 16)
    student = sharpened(tiny_gqa)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a damaged copy of the teacher
        for module in student.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(torch.randn(module.weight.shape, generator=noise) * 0.02)
    shapes = {name: p.shape for name, p in student.named_parameters()}
    before = {name: p.clone() for name, p in student.named_parameters()}
    idle = distill(student, samples, targets, steps=0, lr=3e-3, rank=4, seed=0)
    assert not idle.kept and idle.kl_after == idle.kl_before  # nothing trained, nothing merged
    diverged = distill(student, samples, targets, steps=8, lr=1.0, rank=4, seed=0)
    assert not diverged.kept and diverged.kl_after > diverged.kl_before
    assert all(torch.equal(p, before[name]) for name, p in student.named_parameters())  # dropped
    result = distill(student, samples, targets, steps=40, lr=3e-3, rank=4, seed=0, bfloat16=bfloat16)
    assert result.kept and result.kl_after < 0.1 * result.kl_before
    assert {name: p.shape for name, p in student.named_parameters()} == shapes
    assert not any(p.requires_grad for p in student.parameters())
    assert not any(module._forward_hooks for module in student.modules())


def test_distillation_fits_the_text_windows_own_next_tokens_too(tiny_gqa):
    teacher = sharpened(tiny_gqa)
    samples = torch.randint(0, 300, (4, 32))
    targets = teacher_targets(teacher, samples, k=16)
    text_rows = torch.tensor([True, False, True, False])

    def trained(rows: torch.Tensor | None, weight: float):
        student = sharpened(tiny_gqa)
        result = distill(student, samples, targets, steps=24, lr=3e-3, rank=4, seed=0, text_rows=rows,
                         text_weight=weight)
        with torch.no_grad():
            logits = student(samples).logits
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), samples[:, 1:].flatten(), reduction="none").view(4, -1)
        return result, logits, nll.mean(1)

    kl_only, kl_logits, kl_nll = trained(None, 0.0)
    assert kl_only.loss_before == kl_only.kl_before and kl_only.loss_after == kl_only.kl_after
    unmarked, unmarked_logits, _ = trained(torch.zeros(4, dtype=torch.bool), 1.0)
    assert torch.equal(unmarked_logits, kl_logits)  # the weight applies to text windows only
    mixed, _, mixed_nll = trained(text_rows, 1.0)
    assert mixed.kept and mixed.loss_before > mixed.kl_before  # the check counts the text's NLL too
    assert mixed.loss_after < mixed.loss_before
    assert (mixed_nll[text_rows] < kl_nll[text_rows] - 0.05).all()  # the text's own tokens were learnt


def test_interleave_marks_the_text_rows():
    from intraslice.compressor import interleave

    text, generated = torch.zeros(5, 3, dtype=torch.long), torch.ones(7, 3, dtype=torch.long)
    samples, is_text = interleave(text, generated, seed=0)
    assert is_text.sum() == 5 and torch.equal(is_text, samples[:, 0] == 0)
    assert not torch.equal(is_text, torch.arange(12) < 5)  # shuffled


@pytest.mark.parametrize("bfloat16", [False, True])
def test_distillation_trains_in_bfloat16_and_checks_in_float32(tiny_gqa, bfloat16):
    model = sharpened(tiny_gqa)
    samples = torch.randint(0, 300, (2, 16))
    targets = teacher_targets(model, samples, k=16)
    seen = {True: set(), False: set()}  # output dtypes of a decoder linear, with and without gradients
    model.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda _module, _args, output: seen[torch.is_grad_enabled()].add(output.dtype))
    distill(model, samples, targets, steps=1, lr=1e-3, rank=2, seed=0, bfloat16=bfloat16)
    assert seen[True] == {torch.bfloat16 if bfloat16 else torch.float32}
    assert torch.float32 in seen[False]  # the check before and after the steps


def test_logits_stay_exact_under_bfloat16_autocast(tiny_gqa):
    """Autocast may take the decoder's matmuls to bfloat16, never the head: a bfloat16 logit near 20 is
    off by up to 0.06."""
    from intraslice.precision import bfloat16_autocast

    model = load_reference_model(tiny_gqa)
    ids = torch.randint(0, 300, (2, 16))
    hidden = model.model(ids).detach() * 50  # logits in the tens
    exact = model.lm_head(hidden)
    with bfloat16_autocast(hidden.device, True):
        logits = model.logits(hidden)
        rounded = model.lm_head(hidden)  # the head left to autocast
        decoder_out = model.model(ids)
    assert logits.dtype == torch.float32 and torch.equal(logits, exact)
    assert rounded.dtype == torch.bfloat16 and (rounded.float() - exact).abs().max() > 1e-2
    assert decoder_out.dtype == torch.float32  # the residual stream stays float32 between bfloat16 matmuls


def test_autocast_choices():
    from intraslice.precision import fast_bfloat16, use_bfloat16

    cpu = torch.device("cpu")
    assert use_bfloat16("bfloat16", cpu) and not use_bfloat16("off", cpu)
    assert use_bfloat16("auto", cpu) == fast_bfloat16(cpu)
    assert not fast_bfloat16(torch.device("meta"))


def test_compressor_distillation_is_reported_and_moves_towards_dense(tiny_sharp, tmp_path):
    # random starts only and the text windows' full weight in the MLP fits, as before those became the
    # defaults: on this random tiny model the openings' pieces left the held-out KL above the
    # undistilled one (0.0640 against 0.0625), and so did the built-in prose's quarter weight (0.0524
    # against 0.0506); the distillation is the subject here
    from intraslice.precision import fast_bfloat16

    options = dict(ratio=0.4, opening_share=0.0, mlp_text_weight=1.0,
                   **{**FAST, "samples": 8, "allocation_samples": 4, "distill_steps": 32})
    plain = compress(tiny_sharp, tmp_path / "plain", CompressOptions(**{**options, "distill_steps": 0}))
    # the KL alone: on a random model the text's own tokens pull away from dense (checked below)
    distilled = compress(tiny_sharp, tmp_path / "distilled",
                         CompressOptions(distill_lr=1e-4, distill_rank=4, distill_text_weight=0.0, **options))
    assert plain["distillation"] is None and "distillation" not in plain["stages"]
    assert distilled["layers"] == plain["layers"]
    report = distilled["distillation"]
    assert report["bfloat16_autocast"] == fast_bfloat16(torch.device("cpu"))  # --autocast auto
    assert report["kept"] and report["kl_after"] < report["kl_before"]
    assert report["text_weight"] == 0.0 and report["loss_after"] == report["kl_after"]
    assert distilled["perplexity"]["pruned"] != plain["perplexity"]["pruned"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_sharp)  # held-out text: the KL falls beyond the calibration
    samples = load_token_samples(tokenizer, None, 2, 64, 0, "evaluation")
    dense = F.log_softmax(load_reference_model(tiny_sharp)(samples).logits, -1).detach()

    def kl(folder) -> float:
        with torch.no_grad():
            logits = load_reference_model(folder)(samples).logits
        return float(F.kl_div(F.log_softmax(logits, -1), dense, log_target=True, reduction="batchmean"))

    assert kl(tmp_path / "distilled") < kl(tmp_path / "plain")
    # by default the text windows' own next tokens count too: held-out text of their kind is predicted better
    text_fitted = compress(tiny_sharp, tmp_path / "text", CompressOptions(distill_lr=1e-4, distill_rank=4, **options))
    report = text_fitted["distillation"]
    assert report["text_weight"] == 0.5 and report["kept"] and report["loss_before"] > report["kl_before"]
    assert text_fitted["perplexity"]["pruned"] < distilled["perplexity"]["pruned"]


def test_cli_prints_the_distillation(tiny_gqa, tmp_path, capsys):
    from intraslice.cli import main

    code = main(["compress", str(tiny_gqa), str(tmp_path / "out"), "--ratio", "0.3", "--samples", "4",
                 "--seq-len", "64", "--allocation-samples", "4", "--eval-samples", "0", "--distill-steps", "4",
                 "--distill-lr", "1e-5"])
    out = capsys.readouterr().out
    assert code == 0 and "distillation: loss" in out and "KL to the dense model" in out, out

"""The ratio estimator's gradient statistics, against gradients of explicit masks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from intraslice.allocation import fisher_statistics
from intraslice.generated import draw_tokens
from intraslice.modeling_intraslice import IntraSliceLlamaForCausalLM

HEADS, HEAD_DIM, INTERMEDIATE = 4, 12, 64


def tiny_dense_model() -> IntraSliceLlamaForCausalLM:
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=INTERMEDIATE, num_hidden_layers=3,
                         num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM,
                         max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    return IntraSliceLlamaForCausalLM(config).eval()


def text_nll(model: IntraSliceLlamaForCausalLM, sample: torch.Tensor) -> torch.Tensor:
    return model(sample[None], labels=sample[None]).loss


def mask_gradients(model: IntraSliceLlamaForCausalLM, samples: torch.Tensor, loss=text_nll) -> tuple[list, list, list]:
    """Gradients of multiplicative masks (all ones) on each layer's o_proj and down_proj inputs for the
    summed per-sample losses of `samples` (`loss(model, sample)`), and each o_proj input's covariance."""
    head_masks, neuron_masks, covariances, handles = [], [], [], []
    for layer in model.model.layers:
        head_mask = torch.ones(HEADS * HEAD_DIM, requires_grad=True)
        neuron_mask = torch.ones(INTERMEDIATE, requires_grad=True)
        covariance = []

        def masked_heads(module, args, mask=head_mask, covariance=covariance):
            covariance.append(args[0].detach().reshape(-1, HEADS, HEAD_DIM).double())
            return (args[0] * mask,)
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(masked_heads))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, mask=neuron_mask: (a[0] * mask,)))
        head_masks.append(head_mask)
        neuron_masks.append(neuron_mask)
        covariances.append(covariance)
    for sample in samples:
        loss(model, sample).backward()
    for handle in handles:
        handle.remove()
    return ([m.grad.double() for m in head_masks], [m.grad.double() for m in neuron_masks],
            [torch.einsum("nha,nhb->hab", torch.cat(c), torch.cat(c)) for c in covariances])


def test_fisher_statistics_equal_explicit_mask_gradients():
    """The layer-by-layer backward runs each layer twice (without, then with gradients): each statistic
    must still be recorded exactly once (a double count or a lost gradient fails here)."""
    model = tiny_dense_model()
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    stats = fisher_statistics(model, tokens, group_size=2, labels="text")
    assert not any(p.requires_grad for p in model.parameters())
    assert_statistics_match(stats, tokens, text_nll)


def test_sampled_label_statistics_equal_explicit_mask_gradients():
    """The true Fisher's statistics: gradients of the NLL of next tokens drawn from the model's own
    prediction at every position (the same draws as `fisher_statistics`, one seeded generator), and
    not the text's tokens."""
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    stats = fisher_statistics(tiny_dense_model(), tokens, group_size=2, labels="sampled", seed=3)
    generator = torch.Generator().manual_seed(3)

    def sampled_nll(model: IntraSliceLlamaForCausalLM, sample: torch.Tensor) -> torch.Tensor:
        logits = model(sample[None]).logits[0].float()
        drawn = draw_tokens(logits.detach().softmax(-1), generator)
        assert not torch.equal(drawn[:-1], sample[1:])
        return F.cross_entropy(logits, drawn)
    assert_statistics_match(stats, tokens, sampled_nll)


def assert_statistics_match(stats, tokens: torch.Tensor, loss) -> None:
    for group in range(2):
        head_grads, neuron_grads, _ = mask_gradients(tiny_dense_model(), tokens[2 * group:2 * group + 2], loss)
        for layer in range(3):
            diagonal = stats.head_grad_outer[group, layer].diagonal(dim1=-2, dim2=-1).flatten()
            torch.testing.assert_close(diagonal, head_grads[layer], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(stats.neuron_grad[group, layer], neuron_grads[layer], rtol=1e-4, atol=1e-6)
    _, _, covariances = mask_gradients(tiny_dense_model(), tokens)
    for layer in range(3):
        torch.testing.assert_close(stats.head_cov[layer], covariances[layer], rtol=1e-5, atol=1e-6)

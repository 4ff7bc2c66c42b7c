"""Recovery after compression: a short self-distillation of the pruned model towards the dense one.

The least-squares folds repair each module on its own; what is left is the error the modules add up
to. A few steps of distillation on the calibration samples fit the whole pruned model to the dense
model's next-token distributions (the teacher's full distribution carries more than the one token that
came next, and the model's own samples have no other label). On the calibration text's windows the
text's own next tokens count too (`text_weight` x their NLL added to the KL), as recovery fine-tuning
does: the pruned model cannot copy the dense one everywhere, and where they disagree on real text the
text knows better. On the example model at R = 0.2 this took pydoc from 1.144x to 1.04x of the dense
perplexity, every unseen text 0.5-4% closer, and left the KL on the model's own samples as it was
(docs/results.md).

- Teacher: the dense model's top-k log-probabilities per position, taken while the dense model is
  loaded for calibration anyway, from the Fisher pass's final hidden states where it ran (k = 64:
  25 MB for 64 x 512 tokens, where the full distributions take 6 GB). The loss is the KL divergence on
  the top-k tokens plus one bucket for all the others, exact for those k + 1 outcomes.
- Student: low-rank updates W + B A (LoRA) of every linear layer of the decoder, merged into the weights
  at the end, so the checkpoint keeps its shapes; the optimiser state stays small for any model size.
  On the example model at R = 0.3 this came within 0.01x of updating every weight with AdamW on the
  same domain (docs/results.md), without three extra copies of the weights.
- Safety: updates that do not lower the loss (the KL, plus the weighted NLL on text windows) on the
  first calibration samples are dropped.
- Memory: one sample per step, checkpointed layer by layer like the Fisher pass, the loss taken in
  chunks of positions.
- Precision: the decoder's passes under bfloat16 autocast where the device multiplies bfloat16
  natively (`--autocast`, intraslice.precision); the logits, the loss and the check stay float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from intraslice.evaluate import backward_in_chunks, backward_layer_by_layer, chunk_spans
from intraslice.heap import release_free_memory
from intraslice.modeling_intraslice import IntraSliceLlamaForCausalLM
from intraslice.precision import bfloat16_autocast

TOP_K = 64
FORWARD_CHUNK = 256  # positions whose logits exist at once in passes without gradients (50 MB, 49k vocabulary)


@dataclass
class TeacherTargets:
    """The teacher's top-k next-token log-probabilities per sample and position."""
    log_probs: torch.Tensor  # [N, T, k] float32
    tokens: torch.Tensor     # [N, T, k] int64 token ids

    def of(self, index: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `index`'s targets [1, T, k] on `device`."""
        return self.log_probs[index:index + 1].to(device), self.tokens[index:index + 1].to(device)


@torch.no_grad()
def teacher_targets(teacher: IntraSliceLlamaForCausalLM, samples: torch.Tensor, k: int = TOP_K,
                    known_hidden: torch.Tensor | None = None) -> TeacherTargets:
    """Top-k log-probabilities of `teacher` at every position of `samples` [N, T], written into
    tensors allocated up front (small results kept between freed activations would pin the heap).
    `known_hidden` [M, T, d]: the teacher's final normed hidden states of the first M samples, already
    computed (the Fisher pass's), which spares their decoder passes."""
    device = next(teacher.parameters()).device
    known = 0 if known_hidden is None else min(len(known_hidden), len(samples))
    targets = TeacherTargets(torch.empty(*samples.shape, k), torch.empty(*samples.shape, k, dtype=torch.long))
    for index in tqdm(range(len(samples)), desc="distillation: teacher", unit="sample"):
        hidden = (known_hidden[index:index + 1].to(device) if index < known
                  else teacher.model(samples[index:index + 1].to(device)))
        for span in chunk_spans(hidden.shape[1], FORWARD_CHUNK):
            top = F.log_softmax(teacher.logits(hidden[:, span]), -1).topk(k, -1)
            targets.log_probs[index, span] = top.values[0].cpu()
            targets.tokens[index, span] = top.indices[0].cpu()
        release_free_memory()
    return targets


def top_k_kl(log_q: torch.Tensor, target_log_probs: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) over positions, on the teacher's top-k tokens plus one bucket
    holding every other token, from the student's log-probabilities `log_q`."""
    top_log_q = log_q.gather(-1, target_tokens)
    p = target_log_probs.exp()
    rest_p = (1 - p.sum(-1)).clamp(min=1e-12)
    rest_q = (1 - top_log_q.exp().sum(-1)).clamp(min=1e-12)
    return ((p * (target_log_probs - top_log_q)).sum(-1) + rest_p * (rest_p.log() - rest_q.log())).sum()


def chunk_losses(logits: torch.Tensor, log_probs: torch.Tensor, tokens: torch.Tensor, sample: torch.Tensor,
                 span: slice, text_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed top-k KL at positions `span` of `sample` [1, T] (`logits` [1, len(span), vocab], the
    teacher's `log_probs` and `tokens` for the whole sample), and the training loss there: the KL plus
    `text_weight` x the NLL of the sample's own next tokens (the last position has none). One
    log-softmax serves both (a 128 x 49k chunk of it is 25 MB)."""
    log_q = F.log_softmax(logits.float(), -1)
    kl = top_k_kl(log_q, log_probs[:, span], tokens[:, span])
    if not text_weight:
        return kl, kl
    following = sample[:, span.start + 1:span.stop + 1]
    nll = -log_q[:, :following.shape[1]].gather(-1, following.unsqueeze(-1)).sum()
    return kl, kl + text_weight * nll


class LowRankUpdates:
    """Trainable W + B A on every linear layer of the decoder layers, as forward hooks (the modules stay
    as they are); `remove` takes the hooks off, `merge` then folds B A into the weights. B starts at
    zero, so the model starts exactly as compressed."""

    def __init__(self, model: IntraSliceLlamaForCausalLM, rank: int, generator: torch.Generator):
        self.updates: list[tuple[nn.Linear, nn.Parameter, nn.Parameter]] = []
        self.handles = []
        for module in model.model.layers.modules():
            if not isinstance(module, nn.Linear):
                continue
            weight = module.weight
            a = nn.Parameter(torch.randn(rank, module.in_features, generator=generator).to(weight)
                             / math.sqrt(module.in_features))
            b = nn.Parameter(torch.zeros(module.out_features, rank).to(weight))
            self.updates.append((module, a, b))
            self.handles.append(module.register_forward_hook(
                lambda _module, args, output, a=a, b=b: output + (args[0] @ a.T) @ b.T))

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, a, b in self.updates for p in (a, b)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    @torch.no_grad()
    def merge(self) -> None:
        for module, a, b in self.updates:
            module.weight += b @ a


@dataclass
class DistillResult:
    kl_before: float    # mean KL per position to the teacher on the check samples
    kl_after: float     # the same with the trained updates
    loss_before: float  # the training loss per position on the check samples: the KL, plus the
    loss_after: float   # weighted NLL of the text's own next tokens on the text windows among them
    kept: bool          # the updates are merged only if they lowered the loss


CHECK_SAMPLES = 8  # calibration samples on which the loss is compared before and after


def samples_used(num_samples: int, steps: int) -> int:
    """How many of the first calibration samples `distill` reads (steps and checks), so that the
    teacher's targets are computed for those alone."""
    return min(num_samples, max(steps, CHECK_SAMPLES))


def distill(model: IntraSliceLlamaForCausalLM, samples: torch.Tensor, targets: TeacherTargets, steps: int,
            lr: float, rank: int, seed: int, bfloat16: bool = False, text_rows: torch.Tensor | None = None,
            text_weight: float = 0.0) -> DistillResult:
    """`steps` AdamW steps (cosine-decayed learning rate, clipped gradients) of low-rank updates, one
    sample per step in order (cycling), towards the teacher's `targets` for `samples` [N, T], and on the
    samples that `text_rows` [N] (bool) marks as real text, towards their own next tokens with weight
    `text_weight`; with `bfloat16`, the decoder's passes under bfloat16 autocast (the logits, the loss
    and the check stay float32). The updates are merged into `model` if they lowered the loss on the
    first samples, else dropped."""
    device = next(model.parameters()).device
    model.requires_grad_(False)
    text_weights = (torch.zeros(len(samples)) if text_rows is None else text_rows.float() * text_weight).tolist()
    check = range(min(CHECK_SAMPLES, len(samples)))
    kl_before, loss_before = check_losses(model, samples, targets, text_weights, check)
    updates = LowRankUpdates(model, rank, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(updates.parameters(), lr=lr, weight_decay=0.0)

    def cosine(step: int) -> float:  # max(): with steps = 0 nothing trains, but the schedule is still built
        return 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    try:
        for step in (bar := tqdm(range(steps), desc="distillation: steps", unit="step")):
            index = step % len(samples)
            sample = samples[index:index + 1].to(device)
            log_probs, tokens = targets.of(index, device)
            total = []

            def chunk_loss(hidden: torch.Tensor, span: slice) -> torch.Tensor:
                _, loss = chunk_losses(model.logits(hidden), log_probs, tokens, sample, span, text_weights[index])
                total.append(float(loss.detach()) / sample.numel())
                return loss / sample.numel()

            with bfloat16_autocast(device, bfloat16):
                backward_layer_by_layer(model, sample, lambda hidden: backward_in_chunks(hidden, chunk_loss))
            torch.nn.utils.clip_grad_norm_(updates.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            bar.set_postfix(loss=f"{sum(total):.3f}")
            release_free_memory()
        kl_after, loss_after = check_losses(model, samples, targets, text_weights, check)
    finally:
        updates.remove()
    kept = loss_after < loss_before
    if kept:
        updates.merge()
    return DistillResult(kl_before, kl_after, loss_before, loss_after, kept)


@torch.no_grad()
def check_losses(model: IntraSliceLlamaForCausalLM, samples: torch.Tensor, targets: TeacherTargets,
                 text_weights: list[float], indices: range) -> tuple[float, float]:
    """Mean KL per position (`top_k_kl`) of `model` to the teacher on the samples `indices`, and the
    mean training loss per position there (the KL plus each sample's text weight x its NLL)."""
    device = next(model.parameters()).device
    kl, loss = 0.0, 0.0
    for index in indices:
        sample = samples[index:index + 1].to(device)
        hidden = model.model(sample)
        log_probs, tokens = targets.of(index, device)
        for span in chunk_spans(hidden.shape[1], FORWARD_CHUNK):
            chunk_kl, chunk_loss = chunk_losses(model.logits(hidden[:, span]), log_probs, tokens, sample, span,
                                                text_weights[index])
            kl += float(chunk_kl)
            loss += float(chunk_loss)
    positions = len(indices) * samples.shape[1]
    return kl / positions, loss / positions

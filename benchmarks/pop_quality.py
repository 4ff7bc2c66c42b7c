"""Quality of prefill-only pruning (POP) on held-out text: prints a markdown table.

Each evaluation sample is a context of `--context` tokens followed by `--continuation` tokens of the
same held-out text (the `evaluation` split, disjoint from the calibration text). The context is the
prompt; the continuation tokens are then teacher-forced as decode steps. Reported: the loss (nats) of
the first continuation token (predicted by the boundary token), the mean loss of all continuation
tokens, its perplexity, and the loss change against the full model.

Configurations, all with the project's reference model (intraslice/modeling_intraslice.py):
- full model: no skipping (identical to POP with an empty skip set);
- POP at 20, 33 and 50% of the layers, skip set from each selection strategy of intraslice.pop;
- ablation "no KV projections": as POP, but the skipped layers keep no K/V for prompt[:-1]; in those
  layers the boundary token and the decode tokens attend only to themselves and each other (true
  positions kept). This is what a cache without POP's independent KV projections holds.
- ablation "no boundary handling": the last prompt token skips too; its pruned-network output predicts
  the first new token, and decode runs the full model.

Run: .venv/bin/python benchmarks/pop_quality.py [--model DIR] [--samples 48] [--context 256]
(defaults: the example model, built and cached on first use).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from intraslice import pop
from intraslice.data import load_token_samples
from intraslice.modeling_intraslice import IntraSliceLlamaForCausalLM, KVCache

FRACTIONS = (0.2, 1 / 3, 0.5)
ABLATION_FRACTION = 1 / 3


def example_model_dir() -> Path:
    """The float32 example model, in the same cache as the tests use."""
    from intraslice.example_model import build_example_model

    path = Path(os.environ.get("INTRASLICE_CACHE", Path.home() / ".cache" / "intraslice")) / "example-model-float32"
    if not (path / "model.safetensors").is_file():
        build_example_model(path, dtype=torch.float32, overwrite=True)
    return path


def forward_without_prompt_kv(model: IntraSliceLlamaForCausalLM, ids: torch.Tensor, cache: KVCache,
                              no_prompt_kv: frozenset[int], start: int) -> torch.Tensor:
    """Logits of `ids` (positions start..) through every layer over `cache`, where the layers in
    `no_prompt_kv` hold no entries before `start`: there the tokens attend only from `start` on."""
    positions = torch.arange(start, start + ids.shape[1]).expand_as(ids)
    all_keys = torch.arange(start + ids.shape[1]).expand(ids.shape[0], -1)
    h = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        h = layer(h, positions, cache, positions if layer.index in no_prompt_kv else all_keys)
    return model.lm_head(model.model.norm(h)).float()


@torch.no_grad()
def continuation_nll(model: IntraSliceLlamaForCausalLM, ids: torch.Tensor, context: int, skip: list[int],
                     variant: str) -> torch.Tensor:
    """Per-token loss [B, M] of ids[:, context:] after a prefill of ids[:, :context] that skips `skip`.
    variant: "pop", "no_kv" (skipped layers keep no prompt K/V) or "no_boundary" (the last prompt
    token skips too)."""
    skip_set = frozenset(skip)
    prompt, continuation = ids[:, :context], ids[:, context:]
    cache = KVCache(model.config.num_hidden_layers)
    if variant == "no_boundary":
        first = model.lm_head(model.model(prompt, cache=cache, skip_layers=skip_set)[:, -1:]).float()
        rest = model(continuation[:, :-1], cache=cache).logits
        logits = torch.cat([first, rest], dim=1)
    else:
        model.model(prompt[:, :-1], cache=cache, skip_layers=skip_set)
        if variant == "no_kv":
            for i in skip_set:
                cache.layers[i] = None
        elif variant != "pop":
            raise ValueError(f"unknown variant {variant!r}")
        decode_ids = torch.cat([prompt[:, -1:], continuation[:, :-1]], dim=1)  # boundary token, then decode
        logits = (forward_without_prompt_kv(model, decode_ids, cache, skip_set, context - 1) if variant == "no_kv"
                  else model(decode_ids, cache=cache).logits)
    return F.cross_entropy(logits.flatten(0, 1), continuation.flatten(), reduction="none").view_as(continuation)


def evaluate(model, ids, context, skip, variant, batch_size) -> tuple[float, float]:
    """(mean first-token loss, mean continuation loss) over all samples."""
    nll = torch.cat([continuation_nll(model, batch, context, skip, variant) for batch in ids.split(batch_size)])
    return float(nll[:, 0].double().mean()), float(nll.double().mean())


def layer_ranges(layers: list[int]) -> str:
    """[20, 21, 22, 25] -> '20-22, 25'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        start = layer if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(f"{start}" if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder (default: the example model)")
    parser.add_argument("--samples", type=int, default=48, help="held-out samples (default: 48)")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens per sample (default: 256)")
    parser.add_argument("--continuation", type=int, default=32, help="scored tokens per sample (default: 32)")
    parser.add_argument("--calibration-samples", type=int, default=pop.DEFAULT_SAMPLES)
    parser.add_argument("--calibration-seq-len", type=int, default=pop.DEFAULT_SEQ_LEN)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model_dir = Path(args.model) if args.model else example_model_dir()
    model, tokenizer = pop.load_model(model_dir)
    num_layers = model.config.num_hidden_layers
    start = time.monotonic()
    calibration = pop.calibration_samples(tokenizer, None, args.calibration_samples, args.calibration_seq_len,
                                          args.seed)
    importance = pop.layer_importance(model, calibration, args.seed)
    analysis_seconds = time.monotonic() - start
    ids = load_token_samples(tokenizer, None, args.samples, args.context + args.continuation, args.seed,
                             split="evaluation")

    rows = [("full model (no POP)", [], "pop")]
    for fraction in FRACTIONS:
        count = pop.skip_count(num_layers, fraction)
        for strategy in pop.STRATEGIES:
            rows.append((f"POP {fraction:.0%}, {strategy}", pop.select_layers(importance.prefill, count, strategy),
                         "pop"))
    ablation_skip = pop.select_layers(importance.prefill, pop.skip_count(num_layers, ABLATION_FRACTION),
                                      pop.DEFAULT_STRATEGY)
    rows.append((f"POP {ABLATION_FRACTION:.0%}, {pop.DEFAULT_STRATEGY}, no KV projections", ablation_skip, "no_kv"))
    rows.append((f"POP {ABLATION_FRACTION:.0%}, {pop.DEFAULT_STRATEGY}, no boundary handling", ablation_skip,
                 "no_boundary"))

    print(f"model {model_dir} ({num_layers} layers); importance from {args.calibration_samples} x "
          f"{args.calibration_seq_len} calibration tokens in {analysis_seconds:.0f} s; evaluation: "
          f"{args.samples} held-out samples, {args.context}-token prompt + {args.continuation} scored tokens\n")
    print("| configuration | skipped layers | first-token loss | continuation loss | perplexity | Δ loss |")
    print("|---|---|---:|---:|---:|---:|")
    baseline = None
    for name, skip, variant in rows:
        first, mean = evaluate(model, ids, args.context, skip, variant, args.batch_size)
        baseline = mean if baseline is None else baseline
        print(f"| {name} | {layer_ranges(skip)} | {first:.3f} | {mean:.4f} | {math.exp(mean):.2f} | "
              f"{mean - baseline:+.4f} |", flush=True)


if __name__ == "__main__":
    main()

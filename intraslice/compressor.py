"""`intraslice compress`: the IntraSlice compressor, in the order of the algorithm.

    calibration (text, the dense model's samples and statements) ─► split of the removed weights
    between attention and MLPs (`--attention-share`), per-layer ratios (global estimator) ─► layer by
    layer, on the already compressed upstream: attention (heads, RoPE pairs, block-intra PCA, least
    squares) then MLP (channel selection, least squares) ─► a short self-distillation of the whole
    pruned model towards the dense one and, on the text windows, the text's own next tokens
    (`--distill-steps`, `--distill-text-weight`) ─► export (a physically smaller checkpoint)
    + report

Memory: the ratio estimator needs gradients through the whole dense model (one copy); compression then
streams the source checkpoint one decoder layer at a time, keeping only that layer, the calibration
activations and the (smaller) compressed layers; the distillation holds the pruned model, its low-rank
updates and one layer's activations at a time. The input folder is never written to; the output
appears whole or not at all (`atomic_output_dir`).
"""
from __future__ import annotations

import json
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from intraslice.adapters import CheckpointWeights, layer_prefix, llama_config, llama_layout, load_llama_config
from intraslice.allocation import (LayerBudgets, allocate, attention_params, decoder_layer_params,
                                   dense_module_params, fisher_statistics, mlp_params, split_removal)
from intraslice.calibration import embed_batches, positions_for
from intraslice.compress_options import CompressOptions, validate
from intraslice.compress_attention import AttentionOptions, compress_attention
from intraslice.compress_mlp import compress_mlp, mlp_width
from intraslice.data import (PYDOC_SOURCE, describe_mix, describe_source, load_mixed_samples, source_shares,
                             window_counts)
from intraslice.distill import DistillResult, TeacherTargets, distill, samples_used, teacher_targets
from intraslice.evaluate import assemble_model, perplexity
from intraslice.export import pruned_config, write_checkpoint
from intraslice.generated import register_openings, sample_token_windows, statement_windows
from intraslice.heap import peak_rss_mb, release_free_memory
from intraslice.io import UserError, atomic_output_dir, check_output_dir
from intraslice.modeling_intraslice import DecoderLayer, IntraSliceLlamaForCausalLM, LayerDims, dense_layer_dims
from intraslice.precision import use_bfloat16


class StageLog:
    """Wall time and peak RSS of each stage, for the report."""

    def __init__(self):
        self.stages: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str):
        release_free_memory()  # what the previous stage freed
        start = time.perf_counter()
        yield
        self.stages[name] = {"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": peak_rss_mb()}


def compress(model_dir: str | Path, out_dir: str | Path, options: CompressOptions) -> dict:
    """Compress the dense checkpoint in `model_dir` into `out_dir`; returns the report."""
    from transformers import AutoTokenizer

    validate(options)
    if options.mlp_text_weight is None:
        options = replace(options, mlp_text_weight=default_mlp_text_weight(options.texts))
    model_dir = Path(model_dir)
    config = load_llama_config(model_dir)
    weights = CheckpointWeights(model_dir, config)
    check_output_dir(out_dir, options.overwrite)
    if config.intermediate_size % options.mlp_multiple:
        raise UserError(f"--mlp-multiple {options.mlp_multiple} does not divide the dense MLP width "
                        f"{config.intermediate_size}")
    if options.pop_skip not in (None, "auto") and int(options.pop_skip) >= config.num_hidden_layers:
        raise UserError(f"--pop-skip {options.pop_skip}: must be auto or a number of layers in "
                        f"0..{config.num_hidden_layers - 1}")
    split_removal(config, options.ratio, options.attention_share)  # an impossible split fails before the work
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    log = StageLog()
    calibration, text_rows, evaluation, budgets, dense_ppl, teacher = calibrate_and_allocate(
        config, weights, tokenizer, options, log)
    source_config = llama_layout(json.loads((model_dir / "config.json").read_text()))
    with log.stage("compression"):
        dims, tensors = compress_layers(config, weights, calibration, text_rows, budgets, options)
        model = assemble_model(llama_config(pruned_config(source_config, dims, [])), weights, tensors, options.device)
    distilled = None
    if teacher is not None:
        with log.stage("distillation"):
            used = len(teacher.log_probs)
            distilled = distill(model, calibration[:used], teacher, options.distill_steps, options.distill_lr,
                                options.distill_rank, options.seed, bfloat16(options), text_rows[:used],
                                options.distill_text_weight)
    with log.stage("evaluation"):
        pruned_ppl = perplexity(model, evaluation, desc="perplexity (pruned)") if evaluation is not None else None
    pop_skip = []
    if options.pop_skip:
        with log.stage("POP analysis"):
            pop_skip = choose_pop_skip(model, tokenizer, options)
    dtype = weights.get("model.embed_tokens.weight").dtype
    report = build_report(config, dims, budgets, options, log, dense_ppl, pruned_ppl, pop_skip, dtype, distilled)
    with log.stage("export"), atomic_output_dir(out_dir, options.overwrite) as tmp:
        out_tensors = {name: t.to(dtype) for name, t in model.state_dict().items()
                       if not (name == "lm_head.weight" and config.tie_word_embeddings)}
        write_checkpoint(tmp, model_dir, pruned_config(source_config, dims, pop_skip), out_tensors, report)
    return report


BUILTIN_TEXT_MLP_WEIGHT = 0.25


def default_mlp_text_weight(texts: tuple[str | None, ...]) -> float:
    """The weight of each calibration text window, against each of the model's own samples, in the MLPs'
    statistics, unless `--mlp-text-weight` gives one. Your own text is the traffic to fit: 1. The
    built-in prose alone only stands in for traffic nobody named, so the MLPs lean on the model's own
    samples, which cover more of what it is asked: 0.25. On the example model that took the King
    James Bible 2.6-7.8% and Newton's Opticks 0.5-2.5% closer to dense, for 3.5-8.5% of the prose's own
    domain and up to 6.2% of modern unseen text (eight paired runs, docs/results.md)."""
    return BUILTIN_TEXT_MLP_WEIGHT if all(describe_source(text) == PYDOC_SOURCE for text in texts) else 1.0


def calibrate_and_allocate(config, weights: CheckpointWeights, tokenizer, options: CompressOptions, log: StageLog
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, LayerBudgets, float | None,
                                      TeacherTargets | None]:
    """Calibration samples (text windows, plus samples and statements drawn from the dense model) and
    which of them are text, held-out evaluation samples, per-layer budgets, the dense perplexity, and
    the dense model's next-token targets for the distillation, from one load of the dense model."""
    generated, from_openings, statements = generated_samples(options)
    with log.stage("calibration data"):
        windows = options.samples - generated - statements
        calibration = (load_mixed_samples(tokenizer, options.texts, options.text_shares, windows, options.seq_len,
                                          options.seed, "calibration", options.text_field)
                       if windows else torch.empty(0, options.seq_len, dtype=torch.long))
        evaluation = (load_mixed_samples(tokenizer, options.texts, options.text_shares, options.eval_samples,
                                         options.seq_len, options.seed, "evaluation", options.text_field)
                      if options.eval_samples else None)
    text_rows = torch.ones(len(calibration), dtype=torch.bool)
    dense_ppl, stats, teacher = None, None, None
    needs_fisher = options.allocation != "uniform" and options.ratio > 0
    needs_teacher = options.distill_steps > 0 and options.ratio > 0
    if generated or statements or needs_fisher or needs_teacher or evaluation is not None:
        dense = assemble_model(config, weights, device=options.device)
        if generated or statements:
            with log.stage("calibration data (generated)"):
                vocab_size = min(len(tokenizer), config.vocab_size)
                drawn = [sample_token_windows(dense, generated - from_openings, options.seq_len, options.seed,
                                              vocab_size)] if generated > from_openings else []
                if from_openings:
                    drawn.append(sample_token_windows(dense, from_openings, options.seq_len, options.seed, vocab_size,
                                                      register_openings(tokenizer)))
                if statements:
                    drawn.append(statement_windows(dense, tokenizer, statements, options.seq_len, options.seed))
                calibration, text_rows = interleave(calibration, torch.cat(drawn), options.seed)
        if evaluation is not None:
            with log.stage("evaluation (dense)"):
                dense_ppl = perplexity(dense, evaluation, desc="perplexity (dense)")
        if needs_fisher:
            with log.stage("allocation"):
                stats = fisher_statistics(dense, calibration[:options.allocation_samples].to(options.device),
                                          options.group_size, options.fisher_labels, options.seed)
        if needs_teacher:
            with log.stage("distillation targets"):
                teacher = teacher_targets(dense, calibration[:samples_used(len(calibration), options.distill_steps)],
                                          known_hidden=None if stats is None else stats.final_hidden)
    method = options.allocation if stats is not None else "uniform"
    budgets = allocate(config, options.ratio, method, stats, options.global_frac, options.attention_share)
    return calibration, text_rows, evaluation, budgets, dense_ppl, teacher


def bfloat16(options: CompressOptions) -> bool:
    """Whether the distillation's decoder passes run under bfloat16 autocast (`--autocast`)."""
    return use_bfloat16(options.autocast, torch.device(options.device))


def generated_samples(options: CompressOptions) -> tuple[int, int, int]:
    """How many calibration samples the dense model samples, how many of those start from the register
    openings, and how many are its statements (none when nothing is pruned)."""
    if options.ratio == 0:
        return 0, 0, 0
    generated = round(options.samples * options.generated_fraction)
    return (generated, round(generated * options.opening_share),
            min(round(options.samples * options.knowledge_fraction), options.samples - generated))


def interleave(text: torch.Tensor, generated: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and generated samples in one seeded random order, so that any prefix (the Fisher samples,
    the attention-shape probe) holds both kinds; and which of them are real text."""
    samples = torch.cat([text, generated])
    is_text = torch.arange(len(samples)) < len(text)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))
    return samples[order], is_text[order]


@torch.no_grad()
def compress_layers(config, weights: CheckpointWeights, calibration: torch.Tensor, text_rows: torch.Tensor,
                    budgets: LayerBudgets, options: CompressOptions) -> tuple[list[LayerDims], dict[str, torch.Tensor]]:
    """Compress every decoder layer, in order, on the outputs of the already compressed ones.
    Rounding (head shapes, MLP multiples) is carried into the next MLP so the total budget holds.
    With `target="dense"`, the dense model's stream runs alongside, and the least-squares folds fit
    each module's output to what the dense model has at that point (correcting upstream drift)
    instead of to the module's own unpruned output (the paper)."""
    device = options.device
    hidden = embed_batches(weights.get("model.embed_tokens.weight").to(device).float(), calibration.to(device),
                           options.batch_size)
    attention_options = AttentionOptions(options.head_dims, options.tp_size, options.compensate,
                                         options.shape_selection)
    multiple = math.lcm(options.mlp_multiple, options.tp_size)
    sample_weights = [torch.where(rows, options.mlp_text_weight, 1.0) for rows in text_rows.split(options.batch_size)]
    dense = dense_layer_dims(config)
    teacher = list(hidden) if options.target == "dense" else None
    dims, tensors, carry = [], {}, 0.0  # carry: weights allowed but not yet spent
    dense_attention, dense_mlp = dense_module_params(config)
    for index in tqdm(range(config.num_hidden_layers), desc="compression: layers", unit="layer"):
        layer = DecoderLayer(config, index, dense)
        expected = layer.state_dict().keys()  # old checkpoints may also hold e.g. rotary inv_freq buffers
        layer.load_state_dict({k: v.float() for k, v in weights.layer(index).items() if k in expected})
        layer = layer.to(device).eval()
        attention_targets = mlp_targets = None
        if teacher is not None:  # the dense model's own stream: each module is fitted to undo upstream drift
            teacher_mid = [t + dense_output(layer.self_attn, layer.input_layernorm(t)) for t in teacher]
            teacher = [t + layer.mlp(layer.post_attention_layernorm(t)) for t in teacher_mid]
            attention_targets = [t - h - bias(layer.self_attn.o_proj) for t, h in zip(teacher_mid, hidden)]
        # the attention may undershoot its budget only by what this layer's MLP can take back; an
        # attention left whole by the allocation stays whole, its MLP absorbing any rounding debt
        budget = budgets.attention_params[index] + carry
        mlp_headroom = dense_mlp - budgets.mlp_params[index]
        if budgets.attention_params[index] < dense_attention and budget < dense_attention:
            layer.self_attn = compress_attention(layer.self_attn, [layer.input_layernorm(h) for h in hidden],
                                                 budget, budget - mlp_headroom, attention_options, attention_targets)
        a = layer.self_attn.dims
        carry = budget - attention_params(config.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim)
        mid = [h + dense_output(layer.self_attn, layer.input_layernorm(h)) for h in hidden]
        if teacher is not None:
            mlp_targets = [t - m - bias(layer.mlp.down_proj) for t, m in zip(teacher, mid)]
        width = mlp_width(budgets.mlp_params[index] + carry, config.hidden_size, config.intermediate_size, multiple)
        carry += budgets.mlp_params[index] - mlp_params(config.hidden_size, width)
        layer.mlp = compress_mlp(layer.mlp, config, [layer.post_attention_layernorm(h) for h in mid], width,
                                 options.compensate, mlp_targets, options.mlp_selection, options.mlp_ridge,
                                 sample_weights)
        layer.self_attn.dims = replace(a, intermediate_size=width)
        dims.append(layer.self_attn.dims)
        with torch.no_grad():
            hidden = [h + layer.mlp(layer.post_attention_layernorm(h)) for h in mid]
        tensors.update({layer_prefix(index) + k: v.detach().cpu() for k, v in layer.state_dict().items()})
        release_free_memory()  # this layer's activations, freed between the tensors kept, would stay resident
    return dims, tensors


def dense_output(attention, x: torch.Tensor) -> torch.Tensor:
    """Attention output (after o_proj) of normed inputs x, without a cache."""
    pos = positions_for(x)
    return attention(x, pos, None, 0, None)


def bias(linear: torch.nn.Linear) -> torch.Tensor | float:
    return 0.0 if linear.bias is None else linear.bias


def choose_pop_skip(model: IntraSliceLlamaForCausalLM, tokenizer, options: CompressOptions) -> list[int]:
    """`--pop-skip auto|N`: the prefill-only skip set from the POP analysis (intraslice.pop), on the
    first `--text` source (the traffic the model mainly serves)."""
    from intraslice import pop

    text = options.texts[0]
    if options.pop_skip == "auto":
        return pop.choose_skip_set(model, tokenizer=tokenizer, text=text)
    count = int(options.pop_skip)  # checked against the layer count by `compress`
    fraction = count / model.config.num_hidden_layers
    return pop.choose_skip_set(model, fraction, tokenizer=tokenizer, text=text) if count else []


def text_windows(options: CompressOptions) -> dict[str, int]:
    """Calibration windows taken from each text source."""
    generated, _, statements = generated_samples(options)
    windows = options.samples - generated - statements
    shares = source_shares(options.texts, options.text_shares)
    counts = window_counts(windows, shares) if windows else [0] * len(shares)
    return {describe_source(source): count for source, count in zip(options.texts, counts)}


def build_report(config, dims: list[LayerDims], budgets: LayerBudgets, options: CompressOptions, log: StageLog,
                 dense_ppl: float | None, pruned_ppl: float | None, pop_skip: list[int], dtype: torch.dtype,
                 distilled: DistillResult | None) -> dict:
    """intraslice_report.json: what was done, what it achieved, and what it cost."""
    import transformers

    dense = dense_layer_dims(config)
    generated, from_openings, statements = generated_samples(options)
    element = torch.tensor([], dtype=dtype).element_size()

    def layer_params(d: LayerDims) -> int:
        return decoder_layer_params(config.hidden_size, d.num_heads, d.num_kv_heads, d.head_dim, d.intermediate_size)

    def kv_bytes(d: LayerDims) -> int:
        return 2 * d.num_kv_heads * d.head_dim * element

    dense_params = layer_params(dense) * config.num_hidden_layers
    pruned_params = sum(layer_params(d) for d in dims)
    return {
        "command": options.command,
        "options": {k: v for k, v in asdict(options).items() if k != "command"},
        "requested_ratio": options.ratio,
        "achieved_ratio": round(1 - pruned_params / dense_params, 5),
        "decoder_params": {"dense": dense_params, "pruned": pruned_params},
        "kv_cache_bytes_per_token": {"dense": kv_bytes(dense) * config.num_hidden_layers,
                                     "pruned": sum(kv_bytes(d) for d in dims), "dtype": str(dtype)},
        "calibration": {"text": describe_mix(options.texts, options.text_shares), "samples": options.samples,
                        "text_windows": text_windows(options),
                        "generated_windows": generated, "generated_from_openings": from_openings,
                        "statement_windows": statements,
                        "seq_len": options.seq_len, "seed": options.seed,
                        "allocation_samples": options.allocation_samples},
        "perplexity": {"text": describe_mix(options.texts, options.text_shares), "split": "evaluation",
                       "samples": options.eval_samples, "seq_len": options.seq_len,
                       "dense": dense_ppl, "pruned": pruned_ppl},
        "allocation": {"method": options.allocation, "fisher_labels": options.fisher_labels,
                       "attention_ratio": budgets.attention_ratio,
                       "mlp_ratio": budgets.mlp_ratio},
        "distillation": None if distilled is None else {
            "steps": options.distill_steps, "lr": options.distill_lr, "rank": options.distill_rank,
            "text_weight": options.distill_text_weight,
            "bfloat16_autocast": bfloat16(options), **asdict(distilled)},
        "layers": [d.to_json() for d in dims],
        "pop_skip_layers": pop_skip,
        "stages": log.stages,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
    }

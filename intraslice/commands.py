"""Subcommands beyond the basics, one `add_*` function per feature module, so that the features
can grow without touching each other. Each handler imports its module lazily (fast `--help`)."""
from __future__ import annotations

import argparse


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    for add in (add_compress, add_eval, add_pop_analyze, add_loadtest):
        add(sub)


def add_compress(sub: argparse._SubParsersAction) -> None:
    """`intraslice compress` (the compressor)."""
    def run(args: argparse.Namespace) -> None:
        from intraslice.compress_options import CompressOptions
        from intraslice.compressor import compress

        options = CompressOptions(
            ratio=args.ratio, allocation=args.allocation, texts=tuple(args.text or defaults.texts),
            text_shares=tuple(args.text_shares or ()), text_field=args.text_field,
            samples=args.samples, generated_fraction=args.generated_fraction, opening_share=args.opening_share,
            knowledge_fraction=args.knowledge_fraction, seq_len=args.seq_len, seed=args.seed,
            allocation_samples=args.allocation_samples, fisher_labels=args.fisher_labels, group_size=args.group_size,
            global_frac=args.global_frac, attention_share=args.attention_share,
            head_dims=tuple(args.head_dims), tp_size=args.tp_size, mlp_multiple=args.mlp_multiple,
            compensate=not args.no_compensation, mlp_ridge=args.mlp_ridge,
            mlp_text_weight=args.mlp_text_weight, target=args.target,
            shape_selection=args.shape_selection, mlp_selection=args.mlp_selection, distill_steps=args.distill_steps,
            distill_lr=args.distill_lr, distill_rank=args.distill_rank,
            distill_text_weight=args.distill_text_weight, eval_samples=args.eval_samples,
            batch_size=args.batch_size, device=args.device, autocast=args.autocast, pop_skip=args.pop_skip,
            overwrite=args.overwrite)
        report = compress(args.model_dir, args.out_dir, options)
        ppl = report["perplexity"]
        print(f"wrote {args.out_dir}: removed {report['achieved_ratio']:.2%} of decoder-layer parameters "
              f"(requested {args.ratio:.2%}); KV cache {report['kv_cache_bytes_per_token']['pruned']} "
              f"B/token (dense {report['kv_cache_bytes_per_token']['dense']})"
              + (f"; held-out perplexity {ppl['dense']:.3f} -> {ppl['pruned']:.3f}" if ppl["pruned"] else ""))
        if (distilled := report["distillation"]) is not None:
            print(f"distillation: loss {distilled['loss_before']:.4f} -> {distilled['loss_after']:.4f} (KL to the "
                  f"dense model {distilled['kl_before']:.4f} -> {distilled['kl_after']:.4f})"
                  + ("" if distilled["kept"] else " (no better: the updates were dropped; try a lower --distill-lr)"))

    from intraslice.compress_options import (ALLOCATION_METHODS, AUTOCAST_CHOICES, FISHER_LABELS, MLP_SELECTIONS,
                                            SHAPE_SELECTIONS, TARGETS, VLLM_HEAD_DIMS, CompressOptions)

    defaults = CompressOptions(ratio=0.0)
    p = sub.add_parser(
        "compress", help="prune a Llama-family model into a physically smaller checkpoint",
        description="IntraSlice: per-layer ratios from a global estimator, then layer by layer attention "
                    "(head removal, RoPE-pair Q/K selection, block-intra PCA on V/O, least squares into "
                    "o_proj) and MLP (channel selection, least squares into down_proj), then a short "
                    "self-distillation towards the dense model (--distill-steps). Writes a checkpoint "
                    "that vLLM (with the intraslice plugin) and transformers (trust_remote_code) load. "
                    "--attention-share sets how much of the removed weight comes from attention (default: "
                    "none, the MLPs give it all, which measured best on the example model). "
                    "The paper's calibration is 128 x 2048 tokens (--samples 128 --seq-len 2048 with "
                    "enough text); the defaults are sized for a small model on a CPU.")
    p.add_argument("model_dir", help="dense Hugging Face model folder (safetensors): Llama, Mistral without "
                                     "sliding window, Phi-3/Phi-4 without LongRoPE, Qwen2/Qwen2.5")
    p.add_argument("out_dir", help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--ratio", type=float, required=True,
                   help="fraction of decoder-layer parameters to remove, 0 <= R <= 0.9")
    p.add_argument("--allocation", choices=ALLOCATION_METHODS, default=defaults.allocation,
                   help="per-layer ratio estimator (default: global-pca, the paper's)")
    p.add_argument("--text", action="append", metavar="SOURCE",
                   help="calibration text (repeatable, to mix sources): a .txt file or folder, a .jsonl file, "
                        "hf:NAME[:CONFIG], builtin:pydoc or builtin:kjv; each source is split into calibration "
                        "and held-out text on its own (default: builtin:pydoc, English prose from the standard "
                        "library)")
    p.add_argument("--text-shares", type=float, nargs="+", metavar="SHARE",
                   help="each --text source's share of the text windows, in order, e.g. --text mine.jsonl "
                        "--text builtin:kjv --text-shares 7 1; a small share of each other kind of text you "
                        "serve helps the pruned model most on it (docs/results.md) (default: equal shares)")
    p.add_argument("--text-field", default="text", help="JSONL / dataset text field (default: text)")
    p.add_argument("--samples", type=int, default=defaults.samples,
                   help=f"calibration samples (default: {defaults.samples})")
    p.add_argument("--generated-fraction", type=float, default=defaults.generated_fraction,
                   help="fraction of the calibration samples sampled from the dense model itself rather than "
                        "taken from --text; generated text keeps the pruned model good on text of other domains "
                        f"(default: {defaults.generated_fraction}; 0 calibrates on --text alone, as the paper)")
    p.add_argument("--opening-share", type=float, default=defaults.opening_share,
                   help="share of the generated samples that start from openings of many kinds of writing "
                        "(intraslice/register_openings.txt: fiction, history, verse, drama, letters, law, "
                        "technical documentation, code, ...) instead of a random token, whose samples are mostly "
                        "modern web text, chat and code "
                        f"(default: {defaults.opening_share}: openings only; 0 for random starts only)")
    p.add_argument("--knowledge-fraction", type=float, default=defaults.knowledge_fraction,
                   help="fraction of the calibration samples made of the dense model's own one-sentence "
                        "statements about countries, cities and languages (intraslice/knowledge_openings.txt), "
                        "so that the channels that recall facts are kept; prose alone rarely asks for them "
                        f"(default: {defaults.knowledge_fraction}; 0 for none)")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len,
                   help=f"tokens per sample (default: {defaults.seq_len})")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help=f"which text windows are taken and which samples are generated (default: {defaults.seed})")
    p.add_argument("--allocation-samples", type=int, default=defaults.allocation_samples,
                   help=f"calibration samples used for the Fisher scores (default: {defaults.allocation_samples})")
    p.add_argument("--fisher-labels", choices=FISHER_LABELS, default=defaults.fisher_labels,
                   help="next tokens whose log-likelihood gradients make the Fisher scores: drawn from the dense "
                        "model's own predictions (sampled, the true Fisher; the other domain 1.2%% better on "
                        "average in the paired runs of docs/results.md) or the calibration text's (text, the paper's "
                        "empirical Fisher) "
                        f"(default: {defaults.fisher_labels})")
    p.add_argument("--group-size", type=int, default=defaults.group_size,
                   help=f"samples whose gradients are summed before squaring (default: {defaults.group_size})")
    p.add_argument("--global-frac", type=int, default=defaults.global_frac,
                   help=f"global-pca units per head (default: {defaults.global_frac})")
    p.add_argument("--attention-share", type=attention_share, default=defaults.attention_share,
                   metavar="SHARE|proportional",
                   help="fraction of the removed weights taken from attention, the MLPs giving the rest; "
                        "proportional: both lose R, as in the paper. On the example model any attention share "
                        "cost quality (docs/results.md), so attention is kept by default; larger models may differ "
                        f"(default: {format_attention_share(defaults.attention_share)})")
    p.add_argument("--head-dims", type=int, nargs="+", default=list(VLLM_HEAD_DIMS),
                   help="allowed per-layer head dims (default: vLLM's CPU attention sizes "
                        f"{' '.join(map(str, VLLM_HEAD_DIMS))}; e.g. add 48)")
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensor-parallel size that kept heads, KV heads and MLP widths must divide by (default: 1)")
    p.add_argument("--mlp-multiple", type=int, default=defaults.mlp_multiple,
                   help=f"MLP widths are rounded to this multiple (default: {defaults.mlp_multiple})")
    p.add_argument("--no-compensation", action="store_true",
                   help="skip the least-squares folds into o_proj and down_proj (ablation)")
    p.add_argument("--mlp-ridge", type=float, default=defaults.mlp_ridge,
                   help="ridge of the MLP's least-squares fold, as a multiple of the mean channel energy; "
                        "larger keeps the fold to correlations that carry over to other text (the paper: 0.01) "
                        f"(default: {defaults.mlp_ridge})")
    p.add_argument("--mlp-text-weight", type=float, default=defaults.mlp_text_weight,
                   help="weight of each calibration text window against each of the model's own samples in the "
                        "MLPs' statistics (which channels stay, the least-squares folds); below 1 the MLPs lean "
                        "less on the calibration text's domain (default: 1 with your own --text, 0.25 with the "
                        "built-in prose alone, which only stands in for your traffic)")
    p.add_argument("--shape-selection", choices=SHAPE_SELECTIONS, default=defaults.shape_selection,
                   help="per-layer attention shape: the candidate with the lowest measured least-squares error "
                        "of the attention output (error), or the paper's retained PCA score (score) "
                        f"(default: {defaults.shape_selection})")
    p.add_argument("--mlp-selection", choices=MLP_SELECTIONS, default=defaults.mlp_selection,
                   help="MLP channels to keep: greedy elimination that accounts for the least-squares fold "
                        "(obs, Optimal Brain Surgeon costs), or the paper's per-channel score C_jj ||W_down[:, j]||^2 "
                        f"(score) (default: {defaults.mlp_selection})")
    p.add_argument("--target", choices=TARGETS, default=defaults.target,
                   help="least-squares target: each module's own unpruned output (own, the paper) or the dense "
                        f"model's output at that point, correcting upstream drift (dense) (default: {defaults.target})")
    p.add_argument("--distill-steps", type=int, default=defaults.distill_steps,
                   help="after compression, steps of self-distillation towards the dense model's next-token "
                        "distributions, one calibration sample per step, cycling (low-rank updates merged into "
                        "the weights; 2.5-3.5 s per 512-token step for the example model on 2 cores); more samples "
                        "and steps (e.g. --samples 96 --distill-steps 96) help most on text like the calibration "
                        f"text; fewer save time; 0 skips it (default: {defaults.distill_steps})")
    p.add_argument("--distill-lr", type=float, default=defaults.distill_lr,
                   help=f"learning rate of the distillation (default: {defaults.distill_lr:g})")
    p.add_argument("--distill-rank", type=int, default=defaults.distill_rank,
                   help=f"rank of the distillation's low-rank updates (default: {defaults.distill_rank})")
    p.add_argument("--distill-text-weight", type=float, default=defaults.distill_text_weight,
                   help="weight of the calibration text's own next tokens in the distillation's loss, on its "
                        "windows: their NLL x this is added to the KL towards the dense model (the model's own "
                        "samples have the KL alone); 0: the dense model's distributions alone "
                        f"(default: {defaults.distill_text_weight:g})")
    p.add_argument("--eval-samples", type=int, default=defaults.eval_samples,
                   help=f"held-out samples for the report's perplexity; 0 skips it (default: {defaults.eval_samples})")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help=f"calibration batch size (default: {defaults.batch_size})")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default=defaults.autocast,
                   help="bfloat16 autocast for the distillation's decoder passes (statistics, least squares, "
                        "the dense model's targets and all logits stay exact; on the example model the same "
                        "perplexities to 0.06%%, 15%% less distillation time on 2 AVX512-BF16 cores); auto: "
                        "where the device multiplies bfloat16 natively (CPUs with AVX512-BF16 or AMX, GPUs "
                        f"from Ampere on) (default: {defaults.autocast})")
    p.add_argument("--pop-skip", default=None, metavar="auto|N",
                   help="also choose a prefill-only skip set (POP) of N layers, or auto, on the first --text "
                        "source (default: off)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=run)


def attention_share(value: str) -> float | None:
    if value == "proportional":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or proportional, got {value!r}") from None


def format_attention_share(share: float | None) -> str:
    """The inverse of `attention_share`, for help texts."""
    return "proportional" if share is None else f"{share:g}"


def add_eval(sub: argparse._SubParsersAction) -> None:
    """`intraslice eval` (perplexity)."""
    def run(args: argparse.Namespace) -> None:
        from intraslice.evaluate import evaluate_dir

        for text in args.text or [None]:
            result = evaluate_dir(args.model_dir, text, args.samples, args.seq_len, args.seed, args.split,
                                  args.text_field, args.device)
            print(f"{result['text']} ({result['split']}, {result['samples']} x {result['seq_len']} tokens): "
                  f"perplexity {result['perplexity']:.4f}")

    p = sub.add_parser("eval", help="perplexity of a dense or pruned checkpoint on held-out text",
                       description="Perplexity with the reference model on held-out text (the evaluation "
                                   "split, disjoint from the compressor's calibration split).")
    p.add_argument("model_dir", help="dense Llama or IntraSlice checkpoint folder")
    p.add_argument("--text", action="append", metavar="SOURCE",
                   help="text source (repeatable, one perplexity each): a .txt file or folder, a .jsonl file, "
                        "hf:NAME[:CONFIG], builtin:pydoc or builtin:kjv (default: builtin:pydoc)")
    p.add_argument("--text-field", default="text", help="JSONL / dataset text field (default: text)")
    p.add_argument("--samples", type=int, default=32, help="samples (default: 32)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="which windows are sampled (default: 0)")
    p.add_argument("--split", choices=("evaluation", "calibration"), default="evaluation",
                   help="which split of the text (default: evaluation)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.set_defaults(func=run)


def add_pop_analyze(sub: argparse._SubParsersAction) -> None:
    """`intraslice pop-analyze` (prefill-only pruning: layer importance and skip set)."""
    def run(args: argparse.Namespace) -> None:
        import json
        from pathlib import Path

        from intraslice import pop

        if args.layers is not None:  # a given skip set: validate and write, no analysis
            layers = pop.validate_skip_set(pop.parse_layers(args.layers),
                                           pop.read_config(args.model_dir)["num_hidden_layers"])
        else:
            report = pop.analyze(args.model_dir, args.fraction, text=args.text, num_samples=args.samples,
                                 seq_len=args.seq_len, seed=args.seed, strategy=args.strategy)
            print(pop.format_table(report))
            output = Path(args.output) if args.output else Path(args.model_dir) / pop.ANALYSIS_FILE
            pop.write_json_atomically(output, report)
            print(f"analysis saved to {output} ({report['seconds']} s)")
            layers = report["skip_layers"]
        if args.write:
            layers = pop.write_skip_set(args.model_dir, layers)
            print(f"pop_skip_layers = {json.dumps(layers)} written to {Path(args.model_dir) / 'config.json'}")

    p = sub.add_parser(
        "pop-analyze", help="prefill-only pruning: rank layers, choose and write the prompt's skip set",
        description="Measure each decoder layer's importance for the prompt (prefill) and for the predicted "
                    "token (decode) with virtual gates and a Fisher-approximated second-order Taylor "
                    "estimate, print the table, save it as JSON and choose the layers the prompt skips.")
    p.add_argument("model_dir", help="a dense Llama or a pruned IntraSlice checkpoint folder")
    p.add_argument("--fraction", type=float, default=1 / 3,
                   help="fraction of the layers to skip, rounded, at most all but one (default: 1/3)")
    p.add_argument("--samples", type=int, default=256, help="calibration samples (default: 256)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per calibration sample (default: 64)")
    p.add_argument("--strategy", choices=("contiguous", "lowest", "last"), default="contiguous",
                   help="contiguous: the block with the lowest total prefill importance; lowest: the least "
                        "important layers anywhere; last: the deepest layers (default: contiguous)")
    p.add_argument("--text", default=None, help="calibration text: a .txt file or folder, a .jsonl file, "
                                                "hf:NAME[:CONFIG], builtin:pydoc or builtin:kjv (default: "
                                                "builtin:pydoc)")
    p.add_argument("--seed", type=int, default=0, help="sample choice and sampled labels (default: 0)")
    p.add_argument("--output", help="where to save the analysis JSON (default: MODEL_DIR/pop_analysis.json)")
    p.add_argument("--layers", help="skip set to use instead of analysing, comma-separated (e.g. 20,21,22; "
                                    "'' turns POP off); for --write")
    p.add_argument("--write", action="store_true",
                   help="write pop_skip_layers into MODEL_DIR/config.json (a dense Llama also gets "
                        "architectures [IntraSliceLlamaForCausalLM])")
    p.set_defaults(func=run)


def add_loadtest(sub: argparse._SubParsersAction) -> None:
    """`intraslice loadtest` (the load-test harness); the same arguments as `python -m loadtests`."""
    from loadtests import cli  # argparse only; the harness (locust, gevent) loads in the handler

    def run(args: argparse.Namespace) -> None:
        cli.run(args)

    p = sub.add_parser("loadtest", help="load-test vLLM servers or model folders side by side",
                       description=cli.DESCRIPTION, epilog=cli.EPILOG.replace("%(prog)s", "intraslice loadtest"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_arguments(p)
    p.set_defaults(func=run)

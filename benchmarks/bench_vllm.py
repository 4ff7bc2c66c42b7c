"""Serving speed of dense vs pruned (and POP) checkpoints through real vLLM servers, side by side in one run.

    .venv/bin/python benchmarks/bench_vllm.py                      # throughput + POP sections
    .venv/bin/python benchmarks/bench_vllm.py --section throughput --pruned ./pruned

Each target gets its own `vllm serve` (same flags: float32, prefix caching off, default torch.compile
unless --eager). All of a section's servers start first and stay up; then each of --rounds rounds
loads every target in turn, in rotating order, with vLLM's own `vllm bench serve`. Figures are
medians over rounds, and ratios the median of per-round ratios. Sections:

- throughput: vLLM's stock `LlamaForCausalLM` on the dense model, the dense model through the plugin
  class (target: within 2% of stock), and the pruned model (target: speedup >= 0.95 x the ideal from
  the FLOP ratio); random prompts at saturating concurrency.
- pop: TTFT at prompt lengths 512, 1024, 2048 (one request at a time) and decode inter-token latency,
  for dense, dense+POP, pruned, pruned+POP, with the ideal TTFT speedups from the FLOP count.

Without --pruned, a hand-sliced copy of the example model (tests/checkpoints.py, ~30% fewer decoder
parameters) stands in for a compressor output. Prints tables; --out writes every figure as JSON.
Timings on a shared machine are noisy: compare numbers from one run only, on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Callable

from transformers import AutoConfig

from intraslice.modeling_intraslice import LayerDims, layer_dims, pop_skip_layers
from serving.server import VllmServer

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_ARCH = ["IntraSliceLlamaForCausalLM"]


@dataclass
class Target:
    name: str
    model_dir: Path
    hf_overrides: dict = field(default_factory=dict)

    def config(self):
        config = AutoConfig.from_pretrained(self.model_dir)
        for key, value in self.hf_overrides.items():
            setattr(config, key, value)
        return config


# --- ideal speedups from the FLOP count ------------------------------------------------------------

def layer_flops(d: LayerDims, hidden: int, tokens: int, context_sum: int, kv_only: bool = False) -> float:
    """FLOPs (2 per multiply-add) of one decoder layer for `tokens` tokens whose attention contexts add
    up to `context_sum`; `kv_only`: POP-skipped prompt tokens (K/V projections only)."""
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    if kv_only:
        return tokens * 2 * hidden * 2 * kv
    projections = 2 * hidden * (2 * q + 2 * kv) + 2 * 3 * hidden * d.intermediate_size
    return tokens * projections + 2 * 2 * q * context_sum  # + QK^T and PV


def prefill_flops(config, prompt_len: int, pop: bool) -> float:
    """FLOPs of a whole prompt's prefill (the LM head runs for the last token only)."""
    skip = pop_skip_layers(config) if pop else frozenset()
    n, hidden = prompt_len, config.hidden_size
    total = 2 * hidden * config.vocab_size
    for i, d in enumerate(layer_dims(config)):
        if i in skip:  # prompt[:-1] writes K/V only; the last token runs the layer over the whole prompt
            total += layer_flops(d, hidden, n - 1, 0, kv_only=True) + layer_flops(d, hidden, 1, n)
        else:
            total += layer_flops(d, hidden, n, n * (n + 1) // 2)
    return total


def decode_flops(config, context: int) -> float:
    """FLOPs of one decode token at `context` tokens of context."""
    return 2 * config.hidden_size * config.vocab_size + sum(
        layer_flops(d, config.hidden_size, 1, context) for d in layer_dims(config))


# --- running servers and `vllm bench serve` --------------------------------------------------------

def kv_cache_tokens(server: VllmServer) -> int | None:
    match = re.search(r"KV cache size: ([\d,]+) tokens", server.log_path.read_text(errors="replace"))
    return int(match.group(1).replace(",", "")) if match else None


def bench_serve(server: VllmServer, model_dir: Path, input_len: int, output_len: int, num_prompts: int,
                concurrency: int) -> dict:
    """One `vllm bench serve` run with random prompts of exactly `input_len` tokens; its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve",
                   "--base-url", server.url, "--model", str(model_dir), "--dataset-name", "random",
                   "--random-input-len", str(input_len), "--random-output-len", str(output_len),
                   "--random-range-ratio", "0", "--num-prompts", str(num_prompts),
                   "--max-concurrency", str(concurrency), "--num-warmups", str(min(concurrency, 2)),
                   "--ignore-eos", "--seed", "0", "--disable-tqdm",
                   "--save-result", "--result-dir", tmp, "--result-filename", "result.json"]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"vllm bench serve failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
        return json.loads((Path(tmp) / "result.json").read_text())


def serve(target: Target, eager: bool) -> VllmServer:
    args = ["--enforce-eager"] if eager else []
    if target.hf_overrides:
        args += ["--hf-overrides", json.dumps(target.hf_overrides)]
    return VllmServer(target.model_dir, extra_args=args, startup_timeout=900).start()


def interleaved(targets: list[Target], measure: Callable[[VllmServer, Target], dict], section: str,
                args) -> dict[str, list[dict]]:
    """`measure(server, target)` for every target in each of `args.rounds` rounds, the order rotating
    each round (the first round's record also gets the server's KV-cache size). All servers are
    started first and stay up (idle ones use no CPU), so every target is measured warm and at the
    same times: no first-server penalty, and drift of a shared machine falls on every target alike."""
    servers: dict[str, VllmServer] = {}
    try:
        for target in targets:
            print(f"[{section}] {target.name}: starting server", flush=True)
            servers[target.name] = serve(target, args.eager)
        samples: dict[str, list[dict]] = {t.name: [] for t in targets}
        for round_index in range(args.rounds):
            shift = round_index % len(targets)
            for target in targets[shift:] + targets[:shift]:
                print(f"[{section}] round {round_index + 1}/{args.rounds}: {target.name}", flush=True)
                samples[target.name].append(measure(servers[target.name], target))
        for target in targets:
            samples[target.name][0]["kv_cache_tokens"] = kv_cache_tokens(servers[target.name])
        return samples
    finally:
        for server in servers.values():
            server.stop()


def run_throughput(targets: list[Target], args) -> dict:
    def measure(server: VllmServer, target: Target) -> dict:
        r = bench_serve(server, target.model_dir, args.input_len, args.output_len, args.num_prompts,
                        args.concurrency)
        return {"output_tok_s": r["output_throughput"], "median_ttft_ms": r["median_ttft_ms"],
                "median_tpot_ms": r["median_tpot_ms"]}

    samples = interleaved(targets, measure, "throughput", args)
    return {name: {"output_tok_s": median(s["output_tok_s"] for s in runs),
                   "median_ttft_ms": median(s["median_ttft_ms"] for s in runs),
                   "median_tpot_ms": median(s["median_tpot_ms"] for s in runs),
                   "kv_cache_tokens": runs[0]["kv_cache_tokens"], "rounds": runs}
            for name, runs in samples.items()}


def run_pop(targets: list[Target], args) -> dict:
    def measure(server: VllmServer, target: Target) -> dict:
        ttft = {n: bench_serve(server, target.model_dir, n, 1, args.ttft_prompts, 1)["median_ttft_ms"]
                for n in args.prompt_lens}
        itl = bench_serve(server, target.model_dir, 256, args.decode_tokens, 2, 1)["median_itl_ms"]
        return {"median_ttft_ms": ttft, "median_itl_ms": itl}

    samples = interleaved(targets, measure, "pop", args)
    return {name: {"median_ttft_ms": {n: median(s["median_ttft_ms"][n] for s in runs) for n in args.prompt_lens},
                   "median_itl_ms": median(s["median_itl_ms"] for s in runs), "rounds": runs}
            for name, runs in samples.items()}


def round_ratio(numerator: dict, denominator: dict, key) -> float:
    """The median over rounds of a per-round ratio: each round's targets ran minutes apart."""
    return median(key(a) / key(b) for a, b in zip(numerator["rounds"], denominator["rounds"]))


# --- reports ---------------------------------------------------------------------------------------

def print_throughput(results: dict, targets: dict[str, Target], args) -> None:
    context = args.input_len + args.output_len // 2
    base = results["dense-stock"]
    print(f"\nThroughput: random {args.input_len}-token prompts, {args.output_len} output tokens, "
          f"{args.num_prompts} requests at concurrency {args.concurrency}")
    print(f"{'target':<14}{'out tok/s':>11}{'TTFT ms':>10}{'TPOT ms':>10}{'KV tokens':>11}{'speedup':>9}{'ideal':>7}")
    for name, r in results.items():
        ideal = decode_flops(targets["dense-stock"].config(), context) / decode_flops(targets[name].config(), context)
        r["speedup"], r["ideal_speedup"] = round_ratio(r, base, lambda x: x["output_tok_s"]), ideal
        print(f"{name:<14}{r['output_tok_s']:>11.1f}{r['median_ttft_ms']:>10.0f}{r['median_tpot_ms']:>10.1f}"
              f"{r['kv_cache_tokens'] or 0:>11,}{r['speedup']:>9.3f}{ideal:>7.3f}")
    if "pruned" in results:
        r = results["pruned"]
        print(f"pruned speedup / ideal = {r['speedup'] / r['ideal_speedup']:.3f} (target >= 0.95)")
    if "dense-plugin" in results:
        print(f"plugin dense / stock dense throughput = {results['dense-plugin']['speedup']:.3f} (target >= 0.98)")


def print_pop(results: dict, targets: dict[str, Target], args) -> None:
    dense = targets["dense"].config()
    print("\nPOP: median TTFT (ms, one request at a time) and decode inter-token latency")
    header = "".join(f"{f'TTFT@{n}':>10}{'x':>6}{'ideal':>7}" for n in args.prompt_lens)
    print(f"{'target':<12}{header}{'ITL ms':>9}")
    for name, r in results.items():
        config, pop = targets[name].config(), name.endswith("+pop")
        row, r["ttft_speedup"], r["ideal_ttft_speedup"] = "", {}, {}
        for n in args.prompt_lens:
            speedup = round_ratio(results["dense"], r, lambda x: x["median_ttft_ms"][n])
            ideal = prefill_flops(dense, n, False) / prefill_flops(config, n, pop)
            r["ttft_speedup"][n], r["ideal_ttft_speedup"][n] = speedup, ideal
            row += f"{r['median_ttft_ms'][n]:>10.0f}{speedup:>6.2f}{ideal:>7.2f}"
        print(f"{name:<12}{row}{r['median_itl_ms']:>9.1f}")
    for model in ("dense", "pruned"):
        if model in results and f"{model}+pop" in results:
            ratio = round_ratio(results[f"{model}+pop"], results[model], lambda x: x["median_itl_ms"])
            print(f"{model}: ITL with POP / without = {ratio:.3f} (target <= 1.02)")


def default_pruned_dir(dense_dir: Path) -> Path:
    """A hand-sliced stand-in for a compressor output (cached beside the example model)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import cached_checkpoint, example_pruned_shapes, write_sliced

    return cached_checkpoint(dense_dir.parent, "example-pruned-handsliced",
                             lambda out: write_sliced(dense_dir, out, example_pruned_shapes()))


def default_skip_set(num_layers: int) -> list[int]:
    """One third of the layers: the deepest ones except the last (POP's default shape)."""
    count = num_layers // 3
    return list(range(num_layers - 1 - count, num_layers - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dense", type=Path, help="dense checkpoint (default: the example model)")
    parser.add_argument("--pruned", type=Path, help="pruned checkpoint (default: a hand-sliced example model)")
    parser.add_argument("--section", choices=["throughput", "pop", "all"], default="all")
    parser.add_argument("--eager", action="store_true", help="--enforce-eager servers (default: torch.compile)")
    parser.add_argument("--rounds", type=int, default=3, help="measurement rounds; all servers stay up and "
                        "each round measures every target, in rotating order (default: 3)")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--ttft-prompts", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--pop-skip", type=int, nargs="+", help="POP skip set (default: the checkpoint's, "
                        "else one third of the layers, the deepest but the last)")
    parser.add_argument("--out", type=Path, help="write all figures as JSON here")
    args = parser.parse_args()

    if args.dense is None:
        from intraslice.example_model import build_example_model
        args.dense = Path.home() / ".cache" / "intraslice" / "example-model-float32"
        if not (args.dense / "model.safetensors").is_file():
            build_example_model(args.dense)
    args.pruned = args.pruned or default_pruned_dir(args.dense)
    dense_config = AutoConfig.from_pretrained(args.dense)
    skip = args.pop_skip or getattr(dense_config, "pop_skip_layers", None) or default_skip_set(
        dense_config.num_hidden_layers)

    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if args.section in ("throughput", "all"):
        targets = {t.name: t for t in (Target("dense-stock", args.dense),
                                       Target("dense-plugin", args.dense, {"architectures": PLUGIN_ARCH}),
                                       Target("pruned", args.pruned))}
        report["throughput"] = run_throughput(list(targets.values()), args)
        print_throughput(report["throughput"], targets, args)
    if args.section in ("pop", "all"):
        plugin, pop = {"architectures": PLUGIN_ARCH}, {"pop_skip_layers": skip}
        targets = {t.name: t for t in (Target("dense", args.dense, {**plugin, "pop_skip_layers": []}),
                                       Target("dense+pop", args.dense, {**plugin, **pop}),
                                       Target("pruned", args.pruned, {"pop_skip_layers": []}),
                                       Target("pruned+pop", args.pruned, pop))}
        report["pop"] = run_pop(list(targets.values()), args)
        print_pop(report["pop"], targets, args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

"""Benchmark of `intraslice compress` on the example model: a table of params, KV-cache bytes per token,
held-out perplexity on the calibration's domain (pydoc prose), on another domain (the King James
Bible) and on any further texts given with `--other-text`, compression time and peak RSS, at R = 0.1..0.4, plus ablations at R = 0.3: attention pruned in
proportion, as in the paper, with allocation global-pca vs global (they differ only in how attention
units are scored, so only where attention is pruned); uniform vs Fisher allocation of the MLPs, and
Fisher scores from the text's own next tokens (the paper) instead of the model's sampled ones;
least-squares compensation off, or with the paper's ridge 0.01; calibration without samples generated
by the model.

    .venv/bin/python benchmarks/bench_compress.py [--work-dir DIR] [--ratios [R ...]] [--no-ablations]
                                                  [--other-text SOURCE ...]

Each compression runs as its own `intraslice compress` process (default options), so its time and
peak RSS are its own. Perplexities: `--eval-samples` x 512 tokens of each evaluation split.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from intraslice.data import KJV_SOURCE
from intraslice.evaluate import evaluate_dir

DOMAINS = {"same": None, "other": KJV_SOURCE}  # column name -> text source; --other-text adds columns


def run_compress(model: Path, out: Path, ratio: float, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "intraslice.cli", "compress", str(model), str(out), "--ratio", str(ratio),
               "--overwrite", *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report = json.loads((out / "intraslice_report.json").read_text())
    report["wall_seconds"] = time.perf_counter() - start
    return report


def perplexities(model_dir: Path, domains: dict[str, str | None], samples: int) -> dict[str, float]:
    return {name: evaluate_dir(model_dir, source, samples, 512)["perplexity"] for name, source in domains.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="dense model folder (default: build the example model)")
    parser.add_argument("--work-dir", default="bench-compress", help="where the checkpoints go")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.4],
                        help="ratios of the default sweep; none runs only the ablations")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--other-text", action="append", default=[], metavar="SOURCE",
                        help="another evaluation text (repeatable; any --text source of `intraslice eval`), "
                             "one more perplexity column each")
    args = parser.parse_args()
    domains = {**DOMAINS, **{f"other: {Path(source).name}": source for source in args.other_text}}
    work = Path(args.work_dir)
    model = Path(args.model) if args.model else work / "example-model"
    if not args.model and not (model / "model.safetensors").is_file():
        from intraslice.example_model import build_example_model
        build_example_model(model, overwrite=True)
    runs = [(f"R={r} global-pca", r, []) for r in args.ratios]
    if not args.no_ablations:
        proportional = ["--attention-share", "proportional"]
        runs += [("R=0.3 no distillation", 0.3, ["--distill-steps", "0"]),
                 ("R=0.3 proportional split, global-pca", 0.3, proportional),
                 ("R=0.3 proportional split, global", 0.3, [*proportional, "--allocation", "global"]),
                 ("R=0.3 paper's ridge 0.01", 0.3, ["--mlp-ridge", "0.01"]),
                 ("R=0.3 no least squares", 0.3, ["--no-compensation"]),
                 ("R=0.3 uniform", 0.3, ["--allocation", "uniform"]),
                 ("R=0.3 Fisher on the text's labels", 0.3, ["--fisher-labels", "text"]),
                 ("R=0.3 text-only calibration", 0.3, ["--generated-fraction", "0"])]
    dense = perplexities(model, domains, args.eval_samples)
    header = ("| run | removed | decoder params | KV B/token | "
              + "".join(f"ppl {name} (x dense) | " for name in domains) + "time s | peak RSS MB |")
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|", flush=True)
    for index, (name, ratio, extra) in enumerate(runs):  # rows as they finish: a long run can be cut short
        out = work / "".join(c if c.isalnum() or c in ".-" else "_" for c in name)
        report = run_compress(model, out, ratio, extra)
        ppl = perplexities(out, domains, args.eval_samples)
        if index == 0:
            print(f"| dense | 0 | {report['decoder_params']['dense']:,} "
                  f"| {report['kv_cache_bytes_per_token']['dense']:,} | "
                  + "".join(f"{dense[d]:.3f} | " for d in domains) + "| |")
        peak = max(stage["peak_rss_mb"] for stage in report["stages"].values())
        print(f"| {name} | {report['achieved_ratio']:.3f} | {report['decoder_params']['pruned']:,} "
              f"| {report['kv_cache_bytes_per_token']['pruned']:,} | "
              + "".join(f"{ppl[d]:.3f} ({ppl[d] / dense[d]:.2f}x) | " for d in domains)
              + f"{report['wall_seconds']:.0f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()

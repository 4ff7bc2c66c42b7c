"""Cross-check the load-test harness against `vllm bench serve`: one server, the same prompts, the same
concurrency, output length and warm-up; print both tools' output throughput and latency medians.

    python benchmarks/crosscheck_loadtest.py                       # serves the example model itself
    python benchmarks/crosscheck_loadtest.py --url http://127.0.0.1:8000 --tokenizer DIR

How: the harness runs one closed-loop step (C users, N requests) and writes the prompts it sent to
`prompts.jsonl`; `vllm bench serve --dataset-name sharegpt` gets the same prompts in the same order
(rewritten as a ShareGPT file: its `custom` reader needs pandas, this one does not; `--disable-shuffle`,
prompts sent as they are, at most 1024 tokens), with `--max-concurrency C`, all requests released at once
(which is a closed loop of C), `--ignore-eos` and the same output length. The runs alternate
(harness, bench, harness, bench, ...) so that a change of machine load hits both tools alike.
The issue's bar: within 10% on output throughput and median TTFT.
"""
from __future__ import annotations

import locust  # noqa: F401  (gevent must patch the standard library first)

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtests.harness import Settings, Target, run_loadtest
from loadtests.runner import served_model
from serving.server import VllmServer

FIGURES = [("output throughput (tok/s)", "output_tokens_per_s", "output_throughput"),
           ("median TTFT (ms)", ("ttft", "p50_ms"), "median_ttft_ms"),
           ("median TPOT (ms)", ("tpot", "p50_ms"), "median_tpot_ms"),
           ("median ITL (ms)", ("itl", "p50_ms"), "median_itl_ms"),
           ("median E2E (ms)", ("e2e", "p50_ms"), "median_e2el_ms")]


def harness_round(url: str, tokenizer: str, args, out: Path) -> dict:
    settings = Settings(concurrency=[args.concurrency], requests=args.requests, prompts=args.prompts,
                        max_tokens=args.max_tokens, warmup_requests=args.warmup, seed=args.seed,
                        tokenizer=tokenizer)
    report_dir = run_loadtest([Target("server", url=url)], settings, out, show_progress=False)
    return json.loads((report_dir / "report.json").read_text())["targets"][0]["steps"][0]["summary"]


def sharegpt_file(prompts_file: Path, out: Path) -> Path:
    """The harness's prompts as a ShareGPT JSON file (the second turn is required but not used)."""
    prompts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()]
    out.write_text(json.dumps([{"conversations": [{"from": "human", "value": prompt},
                                                  {"from": "gpt", "value": "unused"}]} for prompt in prompts]))
    return out


def bench_round(url: str, model: str, tokenizer: str, prompts_file: Path, args, out: Path) -> dict:
    dataset = sharegpt_file(prompts_file, out / "prompts-sharegpt.json")
    command = [str(Path(sys.executable).parent / "vllm"), "bench", "serve", "--backend", "openai",
               "--base-url", url, "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
               "--dataset-name", "sharegpt", "--dataset-path", str(dataset), "--disable-shuffle",
               "--sharegpt-output-len", str(args.max_tokens),
               "--num-prompts", str(args.requests), "--max-concurrency", str(args.concurrency),
               "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--num-warmups", str(args.warmup),
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
               "--save-result", "--result-dir", str(out), "--result-filename", "bench.json", "--disable-tqdm"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "bench.json").read_text())


def harness_figure(summary: dict, key) -> float:
    return summary[key] if isinstance(key, str) else summary[key[0]][key[1]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: serve the example model here)")
    parser.add_argument("--model-dir", default=str(Path.home() / ".cache/intraslice/example-model-float32"))
    parser.add_argument("--tokenizer", help="default: --model-dir")
    parser.add_argument("--server-arg", action="append", default=[], help="vLLM flag for the started server")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompts", default="fixed:256")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tokenizer = args.tokenizer or args.model_dir

    server = None if args.url else VllmServer(args.model_dir, extra_args=[
        "--max-num-seqs", str(args.concurrency), *args.server_arg]).start()
    try:
        url = args.url or server.url
        model = served_model(url)["id"]
        results = {"harness": [], "vllm bench": []}
        with tempfile.TemporaryDirectory(prefix="crosscheck-") as tmp:
            for round_index in range(args.rounds):
                out = Path(tmp) / f"round{round_index}"
                results["harness"].append(harness_round(url, tokenizer, args, out / "harness"))
                results["vllm bench"].append(bench_round(url, model, tokenizer, out / "harness" / "prompts.jsonl",
                                                         args, out))
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()

    print(f"\nserver {url} ({model}); {args.requests} requests at concurrency {args.concurrency}, prompts "
          f"{args.prompts}, {args.max_tokens} output tokens (ignore_eos), {args.warmup} warm-up, "
          f"{args.rounds} alternating rounds; per-round values, then the difference of the means\n")
    print(f"| figure | harness | vllm bench serve | harness / bench |")
    print("|---|---|---|---|")
    for label, harness_key, bench_key in FIGURES:
        ours = [harness_figure(summary, harness_key) for summary in results["harness"]]
        theirs = [bench[bench_key] for bench in results["vllm bench"]]
        ratio = statistics.mean(ours) / statistics.mean(theirs)
        print(f"| {label} | {', '.join(f'{x:.1f}' for x in ours)} | {', '.join(f'{x:.1f}' for x in theirs)} "
              f"| {ratio:.3f} ({(ratio - 1) * 100:+.1f}%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

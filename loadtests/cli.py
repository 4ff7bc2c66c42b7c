"""Command line of the load test, shared by `python -m loadtests` and `intraslice loadtest`.

Only argparse here, so that building the parser stays fast; the harness (locust, gevent) is imported
when the command runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from urllib.parse import urlparse

from intraslice.io import UserError

DESCRIPTION = """Load-test OpenAI-compatible vLLM servers side by side: running servers (loopback URLs) or
model folders that it serves itself, one after another with identical settings. Every target gets the same
prompts in the same order and the same steps (a concurrency sweep and/or Poisson request rates); the report
folder has report.md (the table), report.json, report.csv and plots. The first target is the baseline."""

EPILOG = """examples:
  %(prog)s dense=./smollm2 pruned=./smollm2-pruned30 --concurrency 1,4,16 --requests 32 --out report
  %(prog)s http://127.0.0.1:8000 --rate 0.5,1 --duration 60 --prompts text --out report
  %(prog)s dense=./smollm2 pop=./smollm2 --target-arg pop=--hf-overrides \\
      --target-arg 'pop={"architectures": ["IntraSliceLlamaForCausalLM"], "pop_skip_layers": [20, 21]}'"""


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("targets", nargs="+", metavar="TARGET",
                        help="[NAME=]URL or [NAME=]MODEL_DIR; URLs must be loopback (http://127.0.0.1:PORT)")
    steps = parser.add_argument_group("steps")
    steps.add_argument("--concurrency", type=int_list, default=None,
                       help="concurrent users per step, comma-separated (default: 1,4,16, or none with --rate)")
    steps.add_argument("--rate", type=float_list, default=[],
                       help="Poisson request rates in requests/s, comma-separated (open loop)")
    steps.add_argument("--requests", type=int, default=32, help="requests per step (default: 32)")
    steps.add_argument("--duration", type=float, help="seconds per step instead of a request count")
    steps.add_argument("--rate-max-concurrency", type=int, default=32,
                       help="at most this many requests in flight in rate mode (default: 32)")
    steps.add_argument("--warmup", type=int, default=2, help="warm-up requests per target, not counted (default: 2)")
    load = parser.add_argument_group("requests")
    load.add_argument("--prompts", default="fixed:128,512",
                      help="fixed:LEN[,LEN...] (token lengths, real text), text (built-in prose) or jsonl:PATH "
                           "(default: fixed:128,512)")
    load.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default: 64)")
    load.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                      help="let requests stop at end-of-sequence (default: always generate --max-tokens)")
    load.add_argument("--api", choices=("completions", "chat"), default="completions",
                      help="OpenAI endpoint (default: completions)")
    load.add_argument("--seed", type=int, default=0, help="prompt choice and arrival times (default: 0)")
    load.add_argument("--tokenizer", help="tokenizer folder or name (default: the first target's)")
    load.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    serve = parser.add_argument_group("servers started from model folders")
    serve.add_argument("--max-num-seqs", type=int, help="vLLM --max-num-seqs (default: the largest concurrency)")
    serve.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (default: 2)")
    serve.add_argument("--threads", type=int, help="OMP_NUM_THREADS (default: all cores)")
    serve.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                       help="extra vLLM flag for every started server; repeat, e.g. --server-arg=--enforce-eager")
    serve.add_argument("--target-arg", action="append", default=[], metavar="NAME=ARG",
                       help="one extra vLLM argument for one target, taken as is; repeat, e.g. "
                            "--target-arg pop=--hf-overrides --target-arg 'pop={\"pop_skip_layers\": [20, 21]}'")
    serve.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to become healthy (default: 600)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="loadtest-report", help="report folder (default: loadtest-report)")
    out.add_argument("--overwrite", action="store_true", help="replace a non-empty report folder")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress line")


def parse_target(spec: str, index: int):
    from loadtests.harness import Target

    name, sep, source = spec.partition("=")
    if not sep or "/" in name or ":" in name:  # no NAME= prefix (a URL or path may contain '=')
        name, source = "", spec
    if urlparse(source).scheme in ("http", "https"):
        return Target(name or f"server{index + 1}", url=source)
    if not Path(source).is_dir():
        raise UserError(f"target {spec!r} is neither an http:// URL nor an existing folder")
    return Target(name or Path(source).resolve().name, model_dir=Path(source))


def run(args: argparse.Namespace) -> None:
    """Run the load test from parsed arguments; UserError when the report is partial."""
    import json
    import os

    from loadtests.harness import Settings, locust_can_load_here, print_summary, run_loadtest

    if locust_can_load_here():
        import locust  # noqa: F401  (gevent patches the standard library now, before requests loads ssl)

    targets = [parse_target(spec, i) for i, spec in enumerate(args.targets)]
    by_name = {t.name: t for t in targets}
    for item in args.target_arg:
        name, sep, value = item.partition("=")
        if not sep or name not in by_name or by_name[name].model_dir is None:
            raise UserError(f"--target-arg {item!r}: expected NAME=ARG for a target served from a folder")
        by_name[name].serve_args.append(value)
    settings = Settings(
        concurrency=args.concurrency if args.concurrency is not None else ([] if args.rate else [1, 4, 16]),
        rates=args.rate, requests=args.requests, duration=args.duration,
        rate_max_concurrency=args.rate_max_concurrency, prompts=args.prompts, max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos, api=args.api, warmup_requests=args.warmup, seed=args.seed,
        tokenizer=args.tokenizer, max_num_seqs=args.max_num_seqs, kv_cache_space_gib=args.kv_cache_gib,
        threads=args.threads or os.cpu_count() or 1, server_args=args.server_arg,
        request_timeout=args.request_timeout, startup_timeout=args.startup_timeout)
    report_dir = run_loadtest(targets, settings, args.out, overwrite=args.overwrite, show_progress=args.progress)
    print_summary(report_dir)
    report = json.loads((report_dir / "report.json").read_text())
    if not report["complete"]:
        raise UserError(f"partial results ({'; '.join(report['partial_reasons'])}); report in {report_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserError as error:
        print(f"loadtest: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        return 130
    return 0

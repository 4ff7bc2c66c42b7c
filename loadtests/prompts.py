"""Prompt sets for the load test: the same prompts, in the same order, for every target.

Three kinds, chosen with a spec string:
- `fixed:LEN[,LEN...]`: prompts of exactly these token lengths (cycled in the order given), each a window
  of real English prose (the standard library's `pydoc_data.topics`) cut at a seeded random position and
  measured with the target's tokenizer;
- `text`: real text prompts of natural, varying length: seeded random paragraphs of the same built-in
  prose, at most `max_prompt_tokens` long;
- `jsonl:PATH`: a user's file, one JSON object per line with `prompt` (or `text`), optionally
  `max_tokens`; used in file order and cycled when more requests than lines are needed.

Real text rather than random token ids: random ids are not what a server sees, and a tokenizer does not
round-trip them, so their lengths drift.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from intraslice.io import UserError, jsonl_records

MAX_PROMPT_TOKENS = 32768
TEXT_MIN_CHARS = 80  # shorter paragraphs are headings or code fragments, not prompts


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int
    tokens: int | None = None  # as counted by the tokenizer the set was built with (None: not counted)

    def to_json(self) -> dict:
        """A line of the `jsonl:` format (also what `vllm bench serve --dataset-name custom` reads)."""
        line = {"prompt": self.text, "max_tokens": self.max_tokens}
        return line if self.tokens is None else {**line, "tokens": self.tokens}


def builtin_text() -> str:
    """About 465 KB of English prose that every CPython install ships (the `pydoc` help topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def parse_fixed_lengths(spec: str) -> list[int]:
    try:
        lengths = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"fixed prompt lengths must be integers, e.g. fixed:128,512 (got {spec!r})") from None
    if not lengths or not all(1 <= length <= MAX_PROMPT_TOKENS for length in lengths):
        raise UserError(f"fixed prompt lengths must be 1..{MAX_PROMPT_TOKENS} tokens (got {spec!r})")
    return lengths


def fixed_length_prompts(tokenizer, lengths: list[int], count: int, max_tokens: int, seed: int) -> list[Prompt]:
    """`count` prompts whose lengths cycle through `lengths`, each exactly that many tokens when re-encoded
    (windows whose decoded text re-encodes to another length are skipped)."""
    ids = tokenizer(builtin_text(), add_special_tokens=False)["input_ids"]
    if max(lengths) > len(ids):
        raise UserError(f"the built-in text has only {len(ids)} tokens; choose prompt lengths up to that")
    rng = random.Random(seed)
    prompts: list[Prompt] = []
    for index in range(count):
        length = lengths[index % len(lengths)]
        for _attempt in range(100):
            start = rng.randrange(len(ids) - length + 1)
            text = tokenizer.decode(ids[start:start + length])
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == length:
                break
        else:
            raise UserError(f"could not cut a text window that re-encodes to exactly {length} tokens")
        prompts.append(Prompt(text, max_tokens, length))
    return prompts


def text_prompts(tokenizer, count: int, max_tokens: int, seed: int, max_prompt_tokens: int) -> list[Prompt]:
    """`count` paragraphs of the built-in prose, in seeded random order, each at most `max_prompt_tokens`."""
    paragraphs = [p.strip() for p in builtin_text().split("\n\n") if len(p.strip()) >= TEXT_MIN_CHARS]
    random.Random(seed).shuffle(paragraphs)
    prompts = []
    for text in (paragraphs * (count // len(paragraphs) + 1))[:count]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            text = tokenizer.decode(ids[:max_prompt_tokens])
            ids = ids[:max_prompt_tokens]
        prompts.append(Prompt(text, max_tokens, len(ids)))
    return prompts


def jsonl_prompts(path: Path, count: int, max_tokens: int) -> list[Prompt]:
    """The first `count` prompts of a JSONL file (cycled), with per-line `max_tokens` if given."""
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    rows = []
    for number, row in jsonl_records(path):
        text = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            raise UserError(f"{path}:{number}: expected an object with a non-empty string 'prompt' or 'text'")
        line_max = row.get("max_tokens", max_tokens)
        if not isinstance(line_max, int) or line_max < 1:
            raise UserError(f"{path}:{number}: max_tokens must be a positive integer")
        rows.append(Prompt(text, min(line_max, max_tokens)))
    if not rows:
        raise UserError(f"prompt file {path} has no prompts")
    return [rows[index % len(rows)] for index in range(count)]


def needs_tokenizer(spec: str) -> bool:
    return not spec.startswith("jsonl:")


def validate_spec(spec: str) -> None:
    """Fail fast on a malformed spec, before any server is started."""
    if spec.startswith("fixed:"):
        parse_fixed_lengths(spec.removeprefix("fixed:"))
    elif spec.startswith("jsonl:"):
        if not Path(spec.removeprefix("jsonl:")).is_file():
            raise UserError(f"prompt file {spec.removeprefix('jsonl:')} does not exist")
    elif spec != "text":
        raise UserError(f"unknown prompt set {spec!r}; use fixed:LEN[,LEN...], text or jsonl:PATH")


def build_prompts(spec: str, tokenizer, count: int, max_tokens: int, seed: int,
                  max_prompt_tokens: int = 1024) -> list[Prompt]:
    """The prompt list for `spec` (see the module docstring); deterministic for a given seed."""
    validate_spec(spec)
    if spec.startswith("fixed:"):
        return fixed_length_prompts(tokenizer, parse_fixed_lengths(spec.removeprefix("fixed:")), count,
                                    max_tokens, seed)
    if spec.startswith("jsonl:"):
        return jsonl_prompts(Path(spec.removeprefix("jsonl:")), count, max_tokens)
    return text_prompts(tokenizer, count, max_tokens, seed, max_prompt_tokens)

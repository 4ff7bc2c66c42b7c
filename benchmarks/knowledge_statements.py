"""Calibration text that exercises what a model knows: its own greedy statements about entities.

A pruned model keeps the MLP channels that its calibration text uses. Prose rarely asks for a fact, so
the channels that recall facts go first (docs/results.md#factual-recall). This script writes a text
file of short statements for `intraslice compress --text`: openings such as "The capital of Peru is" or
"Lagos is a city in", over the countries and languages of pycountry (in the `test` extra) and the
cities of the time-zone database, each completed greedily by the dense model to the end of its first
sentence. The statements are the model's beliefs, right or wrong: what the pruned model should keep.

    .venv/bin/python benchmarks/knowledge_statements.py MODEL_DIR OUT.txt [--hold-out-benchmark]
    intraslice compress MODEL_DIR OUT --ratio 0.2 --text builtin:pydoc --text OUT.txt --text-shares 3 1

`--hold-out-benchmark` leaves out every entity named in benchmarks/fact_recall.py's prompts, so that
the benchmark measures recall of facts the calibration did not state.
"""
from __future__ import annotations

import argparse
import os
import random
import zoneinfo
from collections import defaultdict

import pycountry
import torch
from transformers import AutoTokenizer

from fact_recall import FACTS
from intraslice.evaluate import load_reference_model
from intraslice.io import UserError

CONTINENTS = ("Africa", "America", "Asia", "Australia", "Europe")


def entities() -> tuple[list[str], list[str], list[str]]:
    """Country, city and language names."""
    countries = [c.name for c in pycountry.countries if "," not in c.name]
    cities = sorted({zone.split("/")[1].replace("_", " ") for zone in zoneinfo.available_timezones()
                     if zone.count("/") == 1 and zone.split("/")[0] in CONTINENTS})
    languages = [language.name for language in pycountry.languages if hasattr(language, "alpha_2")]
    return countries, cities, languages


def openings(hold_out_benchmark: bool) -> list[str]:
    countries, cities, languages = entities()
    if hold_out_benchmark:
        named = {word.strip(",.") for prompt, answer in FACTS for word in f"{prompt} {answer}".split()
                 if word[0].isupper() and len(word) >= 4 and word != "The"}
        countries, cities, languages = ([e for e in names if not any(word in e for word in named)]
                                        for names in (countries, cities, languages))
    return ([f"The capital of {c} is" for c in countries] + [f"{c} is a country in" for c in countries]
            + [f"The official language of {c} is" for c in countries[::2]]
            + [f"{c} is a city in" for c in cities] + [f"The {name} language is spoken in" for name in languages])


@torch.no_grad()
def statements(model, tokenizer, prompts: list[str], max_tokens: int = 20, batch_size: int = 64) -> list[str]:
    """Each prompt with its greedy completion, cut at the first sentence's end."""
    by_length = defaultdict(list)  # the reference model takes unpadded batches: batch prompts of one length
    for prompt in prompts:
        by_length[len(tokenizer(prompt).input_ids)].append(prompt)
    results = []
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            tokens, _ = model.generate_greedy(torch.tensor([tokenizer(p).input_ids for p in batch]), max_tokens)
            for prompt, completion in zip(batch, tokens.tolist()):
                text = tokenizer.decode(completion, skip_special_tokens=True).split("\n")[0]
                results.append(prompt + (text[:text.index(".") + 1] if "." in text else text))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the dense checkpoint folder")
    parser.add_argument("out", help="text file to write")
    parser.add_argument("--hold-out-benchmark", action="store_true",
                        help="leave out the entities of benchmarks/fact_recall.py")
    parser.add_argument("--copies", type=int, default=6,
                        help="shuffled copies of the statements (default: 6, about 130k tokens)")
    args = parser.parse_args()
    if args.copies < 1:
        parser.error("--copies must be >= 1")
    try:
        model = load_reference_model(args.model)
    except UserError as error:
        parser.exit(2, f"knowledge_statements: error: {error}\n")
    lines = statements(model, AutoTokenizer.from_pretrained(args.model), openings(args.hold_out_benchmark))
    rng, documents = random.Random(0), []
    for _ in range(args.copies):  # shuffled copies: every calibration window mixes many entities
        rng.shuffle(lines)
        documents.append(" ".join(lines))
    partial = f"{args.out}.partial"  # renamed when complete: never a half-written file
    with open(partial, "w") as out:
        out.write("\n\n".join(documents))
    os.replace(partial, args.out)
    print(f"{len(lines)} statements, {args.copies} shuffled copies -> {args.out}")


if __name__ == "__main__":
    main()

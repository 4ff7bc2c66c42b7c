"""Factual recall of dense and pruned checkpoints: greedy completions of short factual prompts, scored
by whether the expected answer appears in the first tokens. Perplexity averages over every token and
hides what a pruned model forgets; a user asking "The capital of Japan is" sees it at once.

Each prompt is plain text (no chat template: the example model recalls facts as a completion model,
and answers the same questions in chat mode worse even when dense). Answers come from the project's
reference model (intraslice/modeling_intraslice.py), which vLLM serving matches token for token.

    .venv/bin/python benchmarks/fact_recall.py DENSE_DIR PRUNED_DIR [...] [--max-tokens 8] [--show]
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

from intraslice.evaluate import load_reference_model
from intraslice.io import UserError

FACTS = [  # (prompt, answer that a correct completion contains)
    ("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo"),
    ("The capital of Italy is", "Rome"), ("The capital of Germany is", "Berlin"),
    ("The capital of Spain is", "Madrid"), ("The capital of Russia is", "Moscow"),
    ("The largest planet in the solar system is", "Jupiter"), ("The planet closest to the sun is", "Mercury"),
    ("Romeo and Juliet was written by", "Shakespeare"), ("The Mona Lisa was painted by", "Vinci"),
    ("The theory of relativity was developed by", "Einstein"), ("The telephone was invented by", "Bell"),
    ("The chemical symbol for gold is", "Au"), ("The chemical symbol for water is", "H"),
    ("The tallest mountain in the world is", "Everest"), ("The longest river in Africa is the", "Nile"),
    ("The opposite of hot is", "cold"), ("The opposite of up is", "down"),
    ("A baby cat is called a", "kitten"), ("A baby dog is called a", "puppy"),
    ("Monday, Tuesday, Wednesday,", "Thursday"), ("January, February, March,", "April"),
    ("The Eiffel Tower is in", "Paris"), ("The Statue of Liberty is in", "New York"),
    ("The currency of Japan is the", "yen"), ("The freezing point of water is", "0"),
    ("The first man to walk on the moon was", "Armstrong"), ("Bees make", "honey"),
]


def completions(model_dir: str, max_tokens: int) -> list[str]:
    model = load_reference_model(model_dir)  # checks the folder first: a one-line error if it is not a model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = []
    with torch.no_grad():
        for prompt, _ in FACTS:
            tokens, _ = model.generate_greedy(torch.tensor([tokenizer(prompt).input_ids]), max_tokens)
            texts.append(tokenizer.decode(tokens[0], skip_special_tokens=True).strip())
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="checkpoint folders, dense first")
    parser.add_argument("--max-tokens", type=int, default=8, help="greedy tokens per prompt (default: 8)")
    parser.add_argument("--show", action="store_true", help="print every completion, prompt by prompt")
    args = parser.parse_args()
    try:
        results = {model: completions(model, args.max_tokens) for model in args.models}
    except UserError as error:
        parser.exit(2, f"fact_recall: error: {error}\n")
    if args.show:
        for index, (prompt, answer) in enumerate(FACTS):
            print(f"{prompt!r} (expected {answer!r})")
            for model, texts in results.items():
                print(f"  [{model}] {texts[index]!r}")
    for model, texts in results.items():
        correct = sum(answer.lower() in text.lower() for (_, answer), text in zip(FACTS, texts))
        print(f"{model}: {correct} / {len(FACTS)} facts recalled")


if __name__ == "__main__":
    main()

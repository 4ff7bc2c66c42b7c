"""Factual recall of dense and pruned checkpoints: greedy completions of short factual prompts, scored
by whether the expected answer appears in the first tokens. Perplexity averages over every token and
hides what a pruned model forgets; a user asking "The capital of Japan is" sees it at once.

A second, finer score: the mean log-probability each model gives the dense model's correct answers
(its greedy tokens up to the one that completes the expected word, where the dense model is right).
Pass or fail over 28 prompts moves by whole facts; this moves with every step towards or away from
them, so two variants can be told apart with one run each.

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


@torch.no_grad()
def completions(model, tokenizer, max_tokens: int) -> list[list[int]]:
    """Greedy completion tokens of every prompt."""
    return [model.generate_greedy(torch.tensor([tokenizer(prompt).input_ids]), max_tokens)[0][0].tolist()
            for prompt, _ in FACTS]


def correct_answers(tokenizer, dense_completions: list[list[int]]) -> list[list[int] | None]:
    """Per prompt, the dense completion up to the token that completes the expected answer; None where
    the dense model does not give it."""
    answers = []
    for (_, answer), tokens in zip(FACTS, dense_completions):
        end = next((end for end in range(1, len(tokens) + 1) if recalls(answer, decode(tokenizer, tokens[:end]))),
                   None)
        answers.append(None if end is None else tokens[:end])
    return answers


def decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def recalls(answer: str, text: str) -> bool:
    return answer.lower() in text.lower()


@torch.no_grad()
def mean_answer_log_prob(model, tokenizer, answers: list[list[int] | None]) -> float:
    """Mean over the answered prompts of log p(answer tokens | prompt), teacher-forced."""
    scores = []
    for (prompt, _), answer in zip(FACTS, answers):
        if answer is None:
            continue
        prompt_ids = tokenizer(prompt).input_ids
        logits = model(torch.tensor([prompt_ids + answer])).logits[0, len(prompt_ids) - 1:-1]
        scores.append(float(logits.log_softmax(-1)[torch.arange(len(answer)), answer].sum()))
    return sum(scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="checkpoint folders, dense first")
    parser.add_argument("--max-tokens", type=int, default=8, help="greedy tokens per prompt (default: 8)")
    parser.add_argument("--show", action="store_true", help="print every completion, prompt by prompt")
    args = parser.parse_args()
    texts, scores, answers = {}, {}, None
    for model_dir in args.models:  # one model in memory at a time
        try:
            model = load_reference_model(model_dir)  # checks the folder first: a one-line error if not a model
        except UserError as error:
            parser.exit(2, f"fact_recall: error: {error}\n")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokens = completions(model, tokenizer, args.max_tokens)
        if answers is None:
            answers = correct_answers(tokenizer, tokens)
            if not any(answers):
                parser.exit(2, f"fact_recall: error: {model_dir} (the dense model) recalls none of the facts\n")
        texts[model_dir] = [decode(tokenizer, t) for t in tokens]
        scores[model_dir] = mean_answer_log_prob(model, tokenizer, answers)
    if args.show:
        for index, (prompt, answer) in enumerate(FACTS):
            print(f"{prompt!r} (expected {answer!r})")
            for model_dir, completed in texts.items():
                print(f"  [{model_dir}] {completed[index]!r}")
    answered = sum(a is not None for a in answers)
    for model_dir, completed in texts.items():
        correct = sum(recalls(answer, text) for (_, answer), text in zip(FACTS, completed))
        print(f"{model_dir}: {correct} / {len(FACTS)} facts recalled; mean log-probability of the dense "
              f"model's {answered} correct answers {scores[model_dir]:.3f}")


if __name__ == "__main__":
    main()

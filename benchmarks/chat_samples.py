"""Greedy chat answers of dense and pruned checkpoints to the same everyday prompts, side by side: a
look at what perplexity ratios mean for a chat user.

Each prompt is one user turn through the checkpoint's chat template (with its default system prompt;
a model without a template gets the prompt as plain text), answered greedily by the project's
reference model (intraslice/modeling_intraslice.py), which vLLM serving matches token for token
(tests/test_vllm_model.py).

    .venv/bin/python benchmarks/chat_samples.py DENSE_DIR PRUNED_DIR [...] [--max-tokens 60]
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoTokenizer

from intraslice.evaluate import load_reference_model
from intraslice.io import UserError

PROMPTS = ["The capital of France is", "Explain in one sentence what a hash table is.",
           "Give me three tips for staying healthy.", "Write a haiku about the sea.", "What is 12 times 7?",
           "Who wrote Romeo and Juliet?", "Translate 'good morning' into French.",
           "Summarize the plot of Cinderella in two sentences."]


def answers(model_dir: str, max_tokens: int) -> list[str]:
    model = load_reference_model(model_dir)  # checks the folder first: a one-line error if it is not a model
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    replies = []
    for prompt in PROMPTS:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:  # a base model: the prompt as plain text
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        tokens, _ = model.generate_greedy(ids, max_tokens)
        reply = tokenizer.decode(tokens[0], skip_special_tokens=False)
        replies.append(reply.split(tokenizer.eos_token)[0] if tokenizer.eos_token else reply)
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dirs", nargs="+", help="checkpoint folders (dense or pruned)")
    parser.add_argument("--max-tokens", type=int, default=60)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for model_dir in args.model_dirs:
        try:
            replies = answers(model_dir, args.max_tokens)
        except UserError as error:
            parser.exit(2, f"chat_samples: error: {error}\n")
        print(f"\n## {model_dir}")
        for prompt, reply in zip(PROMPTS, replies):
            print(f"- {prompt!r} -> {reply.strip()!r}")


if __name__ == "__main__":
    main()

"""The whole pipeline on the example model, in one command (`intraslice demo`, `make demo`).

1. build the example model (SmolLM2-135M-Instruct) as a Hugging Face folder;
2. compress it at 30% of decoder parameters with the compressor's defaults, plus a prefill-only-pruning
   skip set;
3. serve the dense model and the pruned model with POP, and send both the same chat requests;
4. load-test dense, dense+POP, pruned and pruned+POP side by side (served one at a time, identical
   settings) and print the report's table.

Every stage is skipped when its output already exists, so a second run only re-measures.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from openai import OpenAI

from loadtests.harness import print_summary, run_for_demo
from serving.server import VllmServer

DEMO_RATIO = 0.3
SAMPLE_PROMPTS = ["The capital of France is", "Explain in one sentence what a hash table is."]


def stage(title: str) -> None:
    print(f"\n=== {title}", flush=True)


@dataclass
class Variant:
    name: str
    model_dir: Path
    hf_overrides: dict | None = None  # e.g. POP switched on at serve time

    @property
    def serve_args(self) -> list[str]:
        args = ["--served-model-name", self.name]
        return args + (["--hf-overrides", json.dumps(self.hf_overrides)] if self.hf_overrides else [])


def build_example(work_dir: Path) -> Path:
    from intraslice.example_model import build_example_model

    path = work_dir / "smollm2-135m"
    if (path / "model.safetensors").is_file():
        print(f"reusing {path}")
    else:
        build_example_model(path, dtype=torch.float32)
        print(f"wrote {path}")
    return path


def compress_example(dense_dir: Path, work_dir: Path) -> Path:
    """The pruned checkpoint, with its POP skip set in the config (served with and without it)."""
    from intraslice.compress_options import CompressOptions
    from intraslice.compressor import compress

    path = work_dir / f"smollm2-135m-pruned{int(DEMO_RATIO * 100)}"
    if (path / "intraslice_report.json").is_file():
        print(f"reusing {path}")
    else:
        # the defaults, so that the model the demo serves is the one `intraslice compress` gives a user
        compress(dense_dir, path, CompressOptions(ratio=DEMO_RATIO, pop_skip="auto", command=["intraslice", "demo"]))
    report = json.loads((path / "intraslice_report.json").read_text())
    print(f"removed {report['achieved_ratio']:.1%} of decoder parameters; "
          f"held-out perplexity {report['perplexity']['dense']:.2f} (dense) -> {report['perplexity']['pruned']:.2f}")
    return path


def pop_variants(dense_dir: Path, pruned_dir: Path) -> list[Variant]:
    """Dense+POP switched on at serve time; pruned+POP as the compressor wrote it."""
    from intraslice.pop import choose_skip_set

    skip = choose_skip_set(dense_dir, fraction=1 / 3)
    print(f"POP skip set of the dense model (prefill only): layers {skip}")
    return [Variant("dense+pop", dense_dir, {"architectures": ["IntraSliceLlamaForCausalLM"], "pop_skip_layers": skip}),
            Variant("pruned+pop", pruned_dir)]


def smoke_requests(variants: list[Variant]) -> None:
    """The same real requests through the OpenAI API to each variant, the answers printed prompt by
    prompt so that a person sees the models talk side by side. The servers run eagerly: no
    torch.compile warm-up at start, and the same answers."""
    answers: dict[str, list[str]] = {}
    for variant in variants:
        with VllmServer(variant.model_dir, extra_args=variant.serve_args + ["--enforce-eager"]) as server:
            client = OpenAI(base_url=server.url + "/v1", api_key="EMPTY")
            answers[variant.name] = [
                client.chat.completions.create(model=variant.name, temperature=0, max_tokens=40,
                                               messages=[{"role": "user", "content": prompt}]
                                               ).choices[0].message.content.strip()
                for prompt in SAMPLE_PROMPTS]
    for index, prompt in enumerate(SAMPLE_PROMPTS):
        print(f"{prompt!r}")
        for name, replies in answers.items():
            print(f"  [{name}] {replies[index]!r}")


def run_demo(work_dir: Path, quick: bool = False) -> None:
    start = time.monotonic()
    work_dir.mkdir(parents=True, exist_ok=True)

    stage("1/4 example model")
    dense_dir = build_example(work_dir)
    variants = [Variant("dense", dense_dir)]

    stage(f"2/4 compress at ratio {DEMO_RATIO}")
    pruned_dir = compress_example(dense_dir, work_dir)
    variants.append(Variant("pruned", pruned_dir, {"pop_skip_layers": []}))
    variants += pop_variants(dense_dir, pruned_dir)

    stage(f"3/4 serve {variants[0].name} and {variants[-1].name}, send both the same requests")
    smoke_requests([variants[0], variants[-1]])  # the load test below serves every variant

    stage("4/4 load test, side by side")
    report_dir = run_for_demo([(v.name, v.model_dir, v.serve_args) for v in variants],
                              work_dir / "loadtest-report", quick=quick)
    print_summary(report_dir)

    print(f"\ndemo finished in {time.monotonic() - start:.0f} s; outputs in {work_dir}")

"""Prefill-only pruning (POP): which decoder layers the prompt can skip, and writing that choice.

Importance analysis (notes/methods.md §2; POP, arXiv 2602.03295):
- A virtual gate scales each decoder layer's whole residual contribution (attention and MLP together):
  h_out = h_in + g * (layer(h_in) - h_in), g = 1. At g = 0 the hidden state passes unchanged while the
  layer still computes its K/V from h_in: exactly what POP does to a skipped layer.
- Every layer has two gates per calibration sample: one on the context positions (all but the last)
  and one on the predicted (last) position. The context gate reaches the loss only through the K/V
  that the predicted position reads: its importance is the *prefill* importance. The predicted gate
  gives the *decode* importance.
- Removing a gate (dg = -1) changes the loss by dL ~ -dl/dg + 1/2 d2l/dg2 (second-order Taylor). The
  label y of the predicted position is sampled from the model itself, so E_y[dl/dg] = 0 and the Fisher
  E_y[(dl/dg)^2] stands in for the Hessian: importance I = 1/2 E[(dl/dg)^2], an estimate of the loss
  increase (nats) from removing the gate. Gates are per sample, so one backward pass gives every
  sample's own gradient.

Choosing the skip set (`count = round(fraction * layers)`, never every layer) from the prefill
importance, by one of three strategies: `lowest` (the least important layers anywhere), `contiguous`
(the contiguous block with the lowest total importance) or `last` (the deepest layers, as the POP
paper does). benchmarks/pop_quality.py measures them on held-out text.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from intraslice.io import UserError
from intraslice.modeling_intraslice import IntraSliceLlamaForCausalLM, pop_skip_layers

DEFAULT_FRACTION = 1 / 3
# 256 x 64 tokens: a few hundred samples (the paper uses 200) in about two minutes on 2 cores for
# the 135M example model; a short context is enough to rank layers (see docs/results.md).
DEFAULT_SAMPLES = 256
DEFAULT_SEQ_LEN = 64
DEFAULT_BATCH_SIZE = 16
STRATEGIES = ("contiguous", "lowest", "last")
DEFAULT_STRATEGY = "contiguous"
ANALYSIS_FILE = "pop_analysis.json"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "IntraSliceLlamaForCausalLM")


@dataclass
class LayerImportance:
    """Per-layer importance (estimated loss increase in nats) of removing the context-position
    (prefill) or the predicted-position (decode) residual branch."""
    prefill: torch.Tensor  # [layers], float64
    decode: torch.Tensor  # [layers], float64
    num_samples: int
    seq_len: int


def load_model(model_dir: str | Path) -> tuple[IntraSliceLlamaForCausalLM, object]:
    """The reference model (float32, eval mode) and tokenizer of a dense or pruned Llama folder."""
    from transformers import AutoTokenizer

    config = read_config(model_dir)
    if not set(config.get("architectures") or []) & set(SUPPORTED_ARCHITECTURES):
        raise UserError(f"{model_dir} holds {config.get('architectures')}; POP supports "
                        f"{' and '.join(SUPPORTED_ARCHITECTURES)} checkpoints")
    model = IntraSliceLlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


@contextlib.contextmanager
def virtual_gates(model: IntraSliceLlamaForCausalLM, context_gates: torch.Tensor,
                  predicted_gates: torch.Tensor) -> Iterator[None]:
    """Scale each layer's residual contribution by a gate: `context_gates[b, l]` at positions
    0..T-2 of sample b, `predicted_gates[b, l]` at its last position. Use for forwards without cache."""
    def hook(layer, args, output):
        h_in = args[0]
        g = torch.cat([context_gates[:, layer.index, None].expand(-1, h_in.shape[1] - 1),
                       predicted_gates[:, layer.index, None]], dim=1)
        return h_in + g[..., None].to(h_in.dtype) * (output - h_in)

    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_importance(model: IntraSliceLlamaForCausalLM, token_ids: torch.Tensor, seed: int = 0,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> LayerImportance:
    """Prefill and decode importance of every layer on calibration samples `token_ids` [N, T]
    (T >= 2; the last position is the predicted one)."""
    num_samples, seq_len = token_ids.shape
    num_layers = model.config.num_hidden_layers
    device = model.lm_head.weight.device
    generator = torch.Generator().manual_seed(seed)  # labels are sampled on the CPU: same on every device
    sums = torch.zeros(2, num_layers, dtype=torch.float64)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # gradients w.r.t. the gates only: no weight gradients are computed
        p.requires_grad_(False)
    try:
        for batch in tqdm(token_ids.split(batch_size), desc="pop-analyze: layer importance", unit="batch"):
            gates = torch.ones(2, batch.shape[0], num_layers, device=device, requires_grad=True)
            with virtual_gates(model, gates[0], gates[1]):
                logits = model.lm_head(model.model(batch.to(device))[:, -1]).float()
            labels = torch.multinomial(logits.detach().softmax(-1).cpu(), 1, generator=generator)[:, 0].to(device)
            loss = F.cross_entropy(logits, labels, reduction="sum")  # per-sample gates: grads stay per sample
            (grad,) = torch.autograd.grad(loss, gates)
            sums += grad.double().pow(2).sum(dim=1).cpu()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    prefill, decode = 0.5 * sums / num_samples
    return LayerImportance(prefill, decode, num_samples, seq_len)


def skip_count(num_layers: int, fraction: float) -> int:
    """Layers to skip for a target fraction: round(fraction * layers), at most all layers but one."""
    if not 0 <= fraction < 1:
        raise UserError(f"--fraction {fraction} must be in [0, 1): at least one layer must run the prompt")
    return min(round(fraction * num_layers), num_layers - 1)


def select_layers(prefill_importance: torch.Tensor, count: int, strategy: str = DEFAULT_STRATEGY) -> list[int]:
    """The `count` layers to skip (sorted), chosen from the prefill importance by `strategy`."""
    n = len(prefill_importance)
    if not 0 <= count < n:
        raise ValueError(f"cannot skip {count} of {n} layers")
    if count == 0:
        return []
    if strategy == "lowest":
        return sorted(prefill_importance.argsort(stable=True)[:count].tolist())
    if strategy == "contiguous":
        block_sums = prefill_importance.unfold(0, count, 1).sum(-1)
        start = int(block_sums.argmin())  # ties go to the shallower block; sums are floats, ties are rare
        return list(range(start, start + count))
    if strategy == "last":
        return list(range(n - count, n))
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")


def calibration_samples(tokenizer, text: str | None, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    from intraslice.data import load_token_samples

    return load_token_samples(tokenizer, text, num_samples, seq_len, seed, split="calibration")


def choose_skip_set(model_or_dir: IntraSliceLlamaForCausalLM | str | Path, fraction: float = DEFAULT_FRACTION,
                    *, tokenizer=None, text: str | None = None, num_samples: int = DEFAULT_SAMPLES,
                    seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0, strategy: str = DEFAULT_STRATEGY) -> list[int]:
    """Analyse a model (or a checkpoint folder) on calibration text and return its POP skip set.
    A model object needs its `tokenizer`; `text` is a `load_token_samples` source (None: built-in)."""
    if isinstance(model_or_dir, (str, Path)):
        model, tokenizer = load_model(model_or_dir)
    elif tokenizer is None:
        raise ValueError("choose_skip_set needs the tokenizer when given a model object")
    else:
        model = model_or_dir
    count = skip_count(model.config.num_hidden_layers, fraction)
    if count == 0:
        return []
    ids = calibration_samples(tokenizer, text, num_samples, seq_len, seed)
    return select_layers(layer_importance(model, ids, seed).prefill, count, strategy)


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise UserError(f"model folder {model_dir} does not exist")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{model_dir} has no config.json") from None
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def validate_skip_set(layers: list[int], num_layers: int) -> list[int]:
    """The skip set, sorted, if the reference model accepts it; a `UserError` otherwise."""
    try:
        return sorted(pop_skip_layers(SimpleNamespace(pop_skip_layers=list(layers), num_hidden_layers=num_layers)))
    except ValueError as error:
        raise UserError(str(error)) from None


def write_json_atomically(path: Path, data: dict) -> None:
    """Write a temp file beside `path`, then rename it over `path`: readers never see half a file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error}") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_skip_set(model_dir: str | Path, layers: list[int]) -> list[int]:
    """Set `pop_skip_layers` in a checkpoint's config.json (atomically); a dense Llama also gets the
    plugin architecture, which is what reads that key. Returns the sorted skip set written."""
    config = read_config(model_dir)
    if not set(config.get("architectures") or []) & set(SUPPORTED_ARCHITECTURES):
        raise UserError(f"{model_dir} holds {config.get('architectures')}; POP supports "
                        f"{' and '.join(SUPPORTED_ARCHITECTURES)} checkpoints")
    layers = validate_skip_set(layers, config["num_hidden_layers"])
    config["pop_skip_layers"] = layers
    config["architectures"] = ["IntraSliceLlamaForCausalLM"]
    write_json_atomically(Path(model_dir) / "config.json", config)
    return layers


def analyze(model_dir: str | Path, fraction: float = DEFAULT_FRACTION, *, text: str | None = None,
            num_samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0,
            strategy: str = DEFAULT_STRATEGY) -> dict:
    """The full analysis of a checkpoint as a JSON-ready dict: per-layer importance, the chosen skip
    set, and the skip set every strategy would choose."""
    from intraslice.data import describe_source

    start = time.monotonic()
    num_layers = read_config(model_dir)["num_hidden_layers"]
    count = skip_count(num_layers, fraction)  # a bad fraction fails before the model loads
    model, tokenizer = load_model(model_dir)
    ids = calibration_samples(tokenizer, text, num_samples, seq_len, seed)
    importance = layer_importance(model, ids, seed)
    return {
        "model_dir": str(model_dir),
        "num_layers": num_layers,
        "fraction": fraction,
        "strategy": strategy,
        "skip_layers": select_layers(importance.prefill, count, strategy),
        "skip_sets": {s: select_layers(importance.prefill, count, s) for s in STRATEGIES},
        "importance": [{"layer": i, "prefill": float(p), "decode": float(d)}
                       for i, (p, d) in enumerate(zip(importance.prefill, importance.decode))],
        "importance_definition": "1/2 E[(dl/dg)^2] over model-sampled labels: estimated loss increase (nats) "
                                 "from removing the layer's residual branch at context (prefill) or "
                                 "predicted (decode) positions",
        "calibration": {"source": describe_source(text), "split": "calibration", "num_samples": num_samples,
                        "seq_len": seq_len, "seed": seed},
        "seconds": round(time.monotonic() - start, 1),
    }


def format_table(report: dict) -> str:
    """The per-layer importance table with the chosen skip set marked."""
    skip = set(report["skip_layers"])
    lines = ["layer   prefill      decode  skip", "-----  ----------  ----------  ----"]
    for row in report["importance"]:
        mark = "yes" if row["layer"] in skip else ""
        lines.append(f"{row['layer']:5d}  {row['prefill']:10.3e}  {row['decode']:10.3e}  {mark}")
    lines.append(f"skip set ({report['strategy']}, {len(skip)} of {report['num_layers']} layers): "
                 f"{report['skip_layers']}")
    return "\n".join(lines)


def parse_layers(text: str) -> list[int]:
    """'20,21,22' -> [20, 21, 22]; '' -> [] (POP off)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--layers {text!r}: expected comma-separated layer indices, e.g. 20,21,22") from None

"""`intraslice eval` and the text sources: perplexity matches a direct computation, splits are
disjoint, bad input fails with one line."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from intraslice.cli import main
from intraslice.data import load_token_samples, split_text
from intraslice.io import UserError

from test_compress import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("eval") / "model", 4, 2)


def test_eval_matches_transformers_loss(tiny_dense, capsys):
    """300-token samples: the loss is summed over three chunks of positions, the last one partial."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    assert main(["eval", str(tiny_dense), "--samples", "3", "--seq-len", "300"]) == 0
    printed = float(capsys.readouterr().out.split("perplexity")[-1])
    tokens = load_token_samples(AutoTokenizer.from_pretrained(tiny_dense), None, 3, 300, 0, "evaluation")
    model = LlamaForCausalLM.from_pretrained(tiny_dense, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    expected = math.exp(float(F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())))
    assert printed == pytest.approx(expected, rel=1e-3)


def test_splits_are_disjoint_by_construction(tmp_path):
    text = "\n\n".join(f"paragraph {i} " + "word " * 50 for i in range(100))
    (tmp_path / "a.txt").write_text(text)
    calibration = split_text(str(tmp_path / "a.txt"), "calibration", "text", 0)
    evaluation = split_text(str(tmp_path / "a.txt"), "evaluation", "text", 0)
    assert calibration + evaluation == text and 0.75 < len(calibration) / len(text) < 0.85
    records = [json.dumps({"body": f"record {i}"}) for i in range(10)]
    (tmp_path / "b.jsonl").write_text("\n".join(records))
    assert "record 9" in split_text(str(tmp_path / "b.jsonl"), "evaluation", "body", 0)
    assert "record 9" not in split_text(str(tmp_path / "b.jsonl"), "calibration", "body", 0)


def test_too_little_text_names_the_numbers(tiny_dense):
    from transformers import AutoTokenizer

    with pytest.raises(UserError, match=r"too little calibration text .* 100000 were requested"):
        load_token_samples(AutoTokenizer.from_pretrained(tiny_dense), None, 100000, 64, 0, "calibration")


@pytest.mark.parametrize("argv,expected", [
    (["eval", "/nonexistent/model"], "does not exist"),
    (["eval", "{model}", "--text", "/nonexistent.txt"], "does not exist"),
    (["eval", "{model}", "--text", "{bad_jsonl}"], "not valid JSON"),
])
def test_eval_bad_input(tiny_dense, tmp_path, capsys, argv, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    code = main([a.format(model=tiny_dense, bad_jsonl=bad) for a in argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and expected in errors[0]

"""`intraslice eval` and the text sources: perplexity matches a direct computation, splits are
disjoint, bad input fails with one line."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from intraslice.cli import main
from intraslice.data import SPLITS, load_mixed_samples, load_token_samples, split_text, window_counts
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


def test_builtin_prose_has_a_name_to_mix_it_by(tiny_dense, capsys):
    assert main(["eval", str(tiny_dense), "--samples", "2", "--seq-len", "64"]) == 0
    assert main(["eval", str(tiny_dense), "--samples", "2", "--seq-len", "64", "--text", "builtin:pydoc"]) == 0
    default, named = capsys.readouterr().out.splitlines()
    assert default == named and default.startswith("builtin:pydoc (evaluation, 2 x 64 tokens): perplexity")


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


@pytest.mark.parametrize("num_samples,shares,expected", [
    (32, [7, 1], [28, 4]), (32, [1, 1, 1], [11, 11, 10]), (16, [0.875, 0.125], [14, 2]),
    (3, [100, 1, 1], [1, 1, 1]), (5, [1, 0.01], [4, 1])])
def test_window_counts_follow_the_shares_and_keep_every_source(num_samples, shares, expected):
    assert window_counts(num_samples, shares) == expected


def test_window_counts_refuse_fewer_windows_than_sources():
    with pytest.raises(UserError, match=r"3 text sources need at least 3 evaluation windows \(one each\), not 2"):
        window_counts(2, [1, 1, 1], "evaluation")


def test_a_mix_takes_each_share_from_its_own_source_split(tiny_dense, tmp_path):
    """Each source is cut into calibration and evaluation text on its own, so a mix's calibration and
    evaluation windows are disjoint source by source, and every source gives its share."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dense)
    sources = []
    for word in ("alpha", "omega"):
        sources.append(str(tmp_path / f"{word}.txt"))
        Path(sources[-1]).write_text("\n\n".join(f"{word} {i}. {word} {word}" for i in range(400)))
    paragraphs = {}
    for split in SPLITS:
        texts = [tokenizer.decode(w) for w in load_mixed_samples(tokenizer, sources, [3, 1], 8, 32, 0, split)]
        assert [("alpha" in t, "omega" in t) for t in texts] == [(True, False)] * 6 + [(False, True)] * 2
        paragraphs[split] = {word: {int(n) for t in texts for n in re.findall(rf"{word} (\d+)\.", t)}
                             for word in ("alpha", "omega")}
    for word in ("alpha", "omega"):
        assert max(paragraphs["calibration"][word]) < min(paragraphs["evaluation"][word]), word


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

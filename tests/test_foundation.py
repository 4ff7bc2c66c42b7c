"""Set-up fix-ups, serving defaults, the server helper's failure paths, and the example-model CLI."""
from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
import time
from pathlib import Path

import pytest

from intraslice.cli import main
from intraslice.io import UserError, atomic_output_dir
from serving.defaults import default_serve_args
from serving.server import ServerError, VllmServer


def test_cpu_install_is_usable():
    """After set-up: the `vllm` version resolves with the +cpu suffix and no CUDA-only companion remains."""
    assert metadata.version("vllm").endswith("+cpu")
    for name in ("torchvision", "torchaudio", "torchcodec"):
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.distribution(name)
    from transformers import LlamaForCausalLM  # noqa: F401  (failed with the CUDA companions installed)


def test_vllm_console_script_works():
    vllm = Path(sys.executable).parent / "vllm"
    result = subprocess.run([str(vllm), "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "+cpu" in result.stdout


def test_plugin_entry_point_registered():
    entry_points = metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.value == "vllm_patches:register" for ep in entry_points)


def test_default_serve_args_respect_user_flags():
    assert "--dtype" in default_serve_args([])
    assert "--dtype" not in default_serve_args(["--dtype", "bfloat16"])
    assert "--dtype" not in default_serve_args(["--dtype=bfloat16"])
    assert "--no-enable-prefix-caching" not in default_serve_args(["--enable-prefix-caching"])


def test_atomic_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_non_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="--overwrite"):
        with atomic_output_dir(tmp_path):
            pass
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_example_model_cli_refuses_non_empty_folder(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    assert main(["example-model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err


def test_server_that_cannot_start_fails_fast_and_leaves_nothing_running(tmp_path):
    server = VllmServer(tmp_path / "no-such-model", startup_timeout=300)
    start = time.monotonic()
    with pytest.raises(ServerError, match="exited with code"):
        server.start()
    assert time.monotonic() - start < 300
    assert not server.is_alive()


@pytest.mark.integration
def test_example_model_is_a_complete_hf_folder(example_model_dir):
    names = {p.name for p in example_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert "chat_template" in (example_model_dir / "tokenizer_config.json").read_text() or \
        "chat_template.jinja" in names

"""Shared fixtures: the example model (built once and cached) and real vLLM servers.

Servers are expensive (30-90 s to start on 2 cores), so `vllm_server(model_dir, *flags)` keeps the
server of the last configuration alive for the whole session and restarts only when a test asks for
another configuration. Group tests of one configuration in one module to avoid restarts.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from checkpoints import cached_checkpoint, example_pruned_shapes, write_sliced
from compare import comparison_prompts
from serving.server import VllmServer

CACHE = Path(os.environ.get("INTRASLICE_CACHE", Path.home() / ".cache" / "intraslice"))


@pytest.fixture(scope="session")
def example_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 Hugging Face folder, built on first use."""
    from intraslice.example_model import build_example_model

    path = CACHE / "example-model-float32"
    if not (path / "model.safetensors").is_file():
        build_example_model(path, dtype=torch.float32, overwrite=True)
    return path


@pytest.fixture(scope="session")
def pruned_example_dir(example_model_dir) -> Path:
    """The example model hand-sliced to ~30% fewer decoder parameters, non-uniform per-layer dims."""
    return cached_checkpoint(CACHE, "example-pruned-handsliced",
                             lambda out: write_sliced(example_model_dir, out, example_pruned_shapes()))


@pytest.fixture(scope="session")
def prompts(example_model_dir) -> list[list[int]]:
    """Token ids of the short prompts and one 1,100-token prompt that vLLM is compared on."""
    return comparison_prompts(example_model_dir)


class ServerPool:
    """At most one live server: the one whose (model, flags) the last test asked for."""

    def __init__(self):
        self.key: tuple | None = None
        self.server: VllmServer | None = None

    def get(self, model: str | Path, *flags: str, env: dict[str, str] | None = None) -> VllmServer:
        key = (str(model), flags, tuple(sorted((env or {}).items())))
        if key != self.key or not self.server.is_alive():
            self.close()
            self.server = VllmServer(model, extra_args=list(flags), env=env, startup_timeout=600)
            self.key = key
            try:
                self.server.start()
            except Exception as error:
                self.key = None
                pytest.fail(f"vLLM server did not start: {error}", pytrace=False)
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.server, self.key = None, None


SERVER_POOL = ServerPool()


@pytest.fixture(scope="session")
def server_pool():
    yield SERVER_POOL
    SERVER_POOL.close()


@pytest.fixture(scope="session")
def vllm_server(server_pool):
    """Call as `vllm_server(model_dir, "--flag", "value", env={...})`; returns a running VllmServer."""
    return server_pool.get


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure of a test that used a server, append the server's last log lines to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "vllm_server" in item.fixturenames and SERVER_POOL.server is not None:
        report.sections.append(("vLLM server log (tail)", SERVER_POOL.server.log_tail(60)))

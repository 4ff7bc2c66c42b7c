"""Start a real `vllm serve` subprocess on a loopback port, wait for `/health`, stop it by PID.

Used by the demo, the load-test harness and the integration tests. vLLM's own flags pass through
unchanged (`extra_args`); only the CPU defaults of `serving.defaults` are added when not given.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from serving.defaults import cpu_env, default_serve_args


class ServerError(RuntimeError):
    """The server could not be started or died; the message says why and where its log is."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_command(model: str | Path, port: int, extra_args: list[str] = ()) -> list[str]:
    """The `vllm serve` command line, as a module call so that it works without the console script."""
    args = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model),
            "--host", "127.0.0.1", "--port", str(port)]
    return args + default_serve_args(extra_args) + list(extra_args)


class VllmServer:
    """A `vllm serve` subprocess. Use as a context manager, or call `start()` and `stop()`.

    >>> with VllmServer("./pruned") as server:
    ...     requests.get(server.url + "/v1/models")
    """

    def __init__(self, model: str | Path, *, port: int | None = None, extra_args: list[str] = (),
                 env: dict[str, str] | None = None, log_path: str | Path | None = None,
                 startup_timeout: float = 600.0):
        self.model = str(model)
        self.port = port or free_port()
        self.command = serve_command(self.model, self.port, list(extra_args))
        self.env = {**os.environ, **cpu_env(), **(env or {})}
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "VllmServer":
        with open(self.log_path, "wb") as log:
            # A new session, so that stop() reaches the engine-core and worker children too.
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"vLLM server for {self.model} exited with code {self.process.returncode} "
                                  f"during start-up; last log lines:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise ServerError(f"vLLM server for {self.model} not healthy after {self.startup_timeout:.0f} s; "
                          f"log: {self.log_path}\n{self.log_tail()}")

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlived the leader still belong to its process group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

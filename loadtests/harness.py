"""The load test's public face: what to test (`Target`), how (`Settings`), and `run_loadtest`.

A target is a running server (a loopback URL) or a checkpoint folder that the harness serves itself with
`serving.server.VllmServer`, every folder with the same vLLM settings (prefix caching off, the same
`--max-num-seqs`, KV-cache space and threads), one after another. Per target: wait for health, send
warm-up requests (not recorded), then each step: a concurrency level (closed loop: N users, each sends
its next request when the previous one finished) or a request rate (open loop: seeded Poisson arrivals),
for a fixed request count or duration. The measuring itself is in `loadtests.runner` (locust).

Locust patches the standard library with gevent when it is imported, and that only works before `ssl`
is loaded. `run_loadtest` therefore measures in this process when that is still possible (the command
line), and otherwise (a caller that already imported torch, openai or requests, like the demo) in a fresh
`python -m loadtests.runner` process, with the same result.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from intraslice.io import UserError, check_output_dir
from loadtests import prompts as prompt_sets

MAX_REQUESTS_PER_STEP = 10_000
MAX_STEP_SECONDS = 3600.0
MAX_CONCURRENCY = 256
MAX_RATE = 100.0
MAX_OUTPUT_TOKENS = 4096


@dataclass
class Target:
    """A model to load-test: `url` of a running server, or `model_dir` to serve with `serve_args`."""
    name: str
    url: str | None = None
    model_dir: str | Path | None = None
    serve_args: list[str] = field(default_factory=list)

    def __post_init__(self):
        if (self.url is None) == (self.model_dir is None):
            raise UserError(f"target {self.name!r}: give exactly one of a URL or a model folder")

    @property
    def source(self) -> str:
        return self.url or str(self.model_dir)


def command_line() -> str:
    """How this process was started, as a user would type it."""
    program = Path(sys.argv[0]).name
    program = "python -m loadtests" if program == "__main__.py" else program
    return " ".join([program, shlex.join(sys.argv[1:])])


@dataclass
class Settings:
    """What to run. Steps: every concurrency of `concurrency`, then every rate of `rates` (requests/s);
    each step sends `requests` requests, or runs `duration` seconds when that is set."""
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    rates: list[float] = field(default_factory=list)
    requests: int = 32
    duration: float | None = None
    rate_max_concurrency: int = 32
    prompts: str = "fixed:128,512"
    max_tokens: int = 64
    ignore_eos: bool = True
    api: str = "completions"
    warmup_requests: int = 2
    seed: int = 0
    tokenizer: str | None = None
    max_prompt_tokens: int = 1024
    max_num_seqs: int | None = None  # default: the largest concurrency
    kv_cache_space_gib: int = 2
    threads: int = os.cpu_count() or 1
    server_args: list[str] = field(default_factory=list)
    request_timeout: float = 300.0
    startup_timeout: float = 600.0
    command: str = field(default_factory=lambda: command_line())

    def validate(self) -> None:
        if not self.concurrency and not self.rates:
            raise UserError("no steps: give at least one concurrency or request rate")
        if not all(1 <= c <= MAX_CONCURRENCY for c in self.concurrency):
            raise UserError(f"concurrency must be 1..{MAX_CONCURRENCY} (got {self.concurrency})")
        if not all(0 < r <= MAX_RATE for r in self.rates):
            raise UserError(f"request rates must be in (0, {MAX_RATE}] requests/s (got {self.rates})")
        if not 1 <= self.requests <= MAX_REQUESTS_PER_STEP:
            raise UserError(f"requests per step must be 1..{MAX_REQUESTS_PER_STEP} (got {self.requests})")
        if self.duration is not None and not 0 < self.duration <= MAX_STEP_SECONDS:
            raise UserError(f"step duration must be in (0, {MAX_STEP_SECONDS:.0f}] s (got {self.duration})")
        if not 1 <= self.max_tokens <= MAX_OUTPUT_TOKENS:
            raise UserError(f"max tokens must be 1..{MAX_OUTPUT_TOKENS} (got {self.max_tokens})")
        if not 1 <= self.rate_max_concurrency <= MAX_CONCURRENCY:
            raise UserError(f"rate-mode concurrency cap must be 1..{MAX_CONCURRENCY}")
        if self.api not in ("completions", "chat"):
            raise UserError(f"api must be completions or chat (got {self.api!r})")
        if not 0 <= self.warmup_requests <= 100:
            raise UserError(f"warm-up requests must be 0..100 (got {self.warmup_requests})")
        if not 0 < self.request_timeout <= MAX_STEP_SECONDS:
            raise UserError(f"request timeout must be in (0, {MAX_STEP_SECONDS:.0f}] s")
        if not all(value is None or value >= 1 for value in (self.max_num_seqs, self.kv_cache_space_gib, self.threads)):
            raise UserError("--max-num-seqs, the KV-cache space and the threads must be at least 1")
        prompt_sets.validate_spec(self.prompts)

    def steps(self) -> list[dict]:
        return ([{"label": f"c={c}", "concurrency": c} for c in self.concurrency]
                + [{"label": f"rate={r:g}/s", "rate": r} for r in self.rates])

    def server_settings(self) -> tuple[list[str], dict[str, str]]:
        """The flags and environment every started server gets: what makes the comparison fair."""
        largest_load = max([*self.concurrency, *([self.rate_max_concurrency] if self.rates else [])])
        max_num_seqs = self.max_num_seqs or largest_load
        args = ["--max-num-seqs", str(max_num_seqs), "--no-enable-prefix-caching", *self.server_args]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_space_gib), "OMP_NUM_THREADS": str(self.threads)}
        return args, env


def check_loopback(url: str) -> str:
    """The URL without a trailing slash, if it is http(s) on a loopback address; UserError otherwise."""
    parsed = urlparse(url)
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port == -1:
        raise UserError(f"{url!r} is not an http:// URL of a server")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(parsed.hostname, port or 80)}
    except socket.gaierror:
        raise UserError(f"cannot resolve the host of {url!r}") from None
    if not all(ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses):
        raise UserError(f"refusing to load-test {url!r}: only loopback addresses (127.0.0.0/8, ::1, localhost) "
                        f"are allowed")
    return url.rstrip("/").removesuffix("/v1")


def check_targets(targets: list[Target]) -> None:
    """Fail fast, before any server starts: unique names, loopback URLs, folders that exist."""
    if not targets:
        raise UserError("no targets: give at least one server URL or model folder")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise UserError(f"target names must be unique (got {names})")
    for target in targets:
        if not target.name or any(c in target.name for c in "/\\ "):
            raise UserError(f"target name {target.name!r} must be non-empty, without spaces or slashes")
        if target.url is not None:
            target.url = check_loopback(target.url)
        elif not (Path(target.model_dir) / "config.json").is_file():
            raise UserError(f"{target.model_dir} is not a model folder (no config.json)")


def locust_can_load_here() -> bool:
    """True if importing locust (gevent's monkey patching) is safe in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return (monkey is not None and monkey.is_module_patched("socket")) or "ssl" not in sys.modules


def run_loadtest(targets: list[Target], settings: Settings, out_dir: str | Path, overwrite: bool = False,
                 show_progress: bool = True) -> Path:
    """Load-test every target with the same prompts and steps; write the report folder and return it.

    Bad settings or targets raise `UserError` before anything starts. Failed targets are marked in the
    report (`complete: false`); Ctrl-C writes the partial report, then raises KeyboardInterrupt.
    """
    settings.validate()
    check_output_dir(out_dir, overwrite)
    check_targets(targets)
    if locust_can_load_here():
        from loadtests.runner import execute

        return execute(targets, settings, Path(out_dir), overwrite, show_progress)
    return run_in_worker(targets, settings, Path(out_dir), overwrite, show_progress)


def run_in_worker(targets: list[Target], settings: Settings, out_dir: Path, overwrite: bool,
                  show_progress: bool) -> Path:
    """`run_loadtest` in a fresh interpreter; its progress goes to this process's stderr."""
    job = {"targets": [{**asdict(t), "model_dir": t.model_dir and str(t.model_dir)} for t in targets],
           "settings": asdict(settings), "out_dir": str(out_dir.resolve()), "overwrite": overwrite,
           "show_progress": show_progress}
    with tempfile.TemporaryDirectory(prefix="loadtest-job-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        # Its own session: a terminal's Ctrl-C reaches only this process, which passes it on exactly once.
        worker = subprocess.Popen([sys.executable, "-m", "loadtests.runner", str(job_file), str(result_file)],
                                  start_new_session=True)
        interrupted = False
        while worker.poll() is None:
            try:
                worker.wait()
            except KeyboardInterrupt:
                if not interrupted:
                    worker.send_signal(signal.SIGINT)
                interrupted = True
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if interrupted or worker.returncode == 130:
        raise KeyboardInterrupt
    if "error" in result:
        raise UserError(result["error"])
    if "report_dir" not in result:
        raise RuntimeError(f"the load-test worker exited with code {worker.returncode} and no result")
    return Path(result["report_dir"])


def run_for_demo(variants: list[tuple[str, Path, list[str]]], out_dir: Path, quick: bool = False) -> Path:
    """The demo's load test: each (name, model folder, serve args) served in turn, a small sweep."""
    targets = [Target(name, model_dir=path, serve_args=list(args)) for name, path, args in variants]
    # Short and long prompts: POP shortens the prefill, so its gain shows in the TTFT of long prompts.
    settings = (Settings(concurrency=[1, 4], requests=8, prompts="fixed:128,1024", max_tokens=16) if quick
                else Settings(concurrency=[1, 4], requests=10, prompts="fixed:128,1024", max_tokens=32))
    return run_loadtest(targets, settings, out_dir, overwrite=True)


def print_summary(report_dir: Path) -> None:
    """Print the report's table (the same as in report.md)."""
    from loadtests.report import summary_table

    print(summary_table(json.loads((Path(report_dir) / "report.json").read_text())))

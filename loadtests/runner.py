"""The measuring part of the load test, with locust: servers started and stopped, warm-up, steps, report.

Locust does the load: one `Environment` and local runner per step, users from `loadtests.client`, their
records collected from locust's `request` event; locust's live statistics feed the progress line.

Faults end in a report that says what is missing, never an empty or misleading one: a target that
cannot start or dies is marked failed and the run goes on with the next target; Ctrl-C stops the servers
it started, writes what was measured (marked partial) and re-raises.

`python -m loadtests.runner JOB.json RESULT.json` runs a job in a fresh process (see `harness.run_in_worker`).
"""
from __future__ import annotations

import locust  # noqa: F401,I001  (first: gevent must patch the standard library before ssl loads)

import json
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import gevent
import requests
from locust.env import Environment
from locust.event import Events

from intraslice.io import UserError, check_output_dir
from loadtests import prompts as prompt_sets
from loadtests.client import StreamingUser
from loadtests.harness import MAX_REQUESTS_PER_STEP, MAX_STEP_SECONDS, Settings, Target
from loadtests.metrics import summarize
from loadtests.plan import StepPlan, poisson_arrivals
from loadtests.records import RequestRecord
from serving.server import ServerError, VllmServer

HEALTH_TIMEOUT = 5.0


def served_model(url: str) -> dict:
    """The first model a running server lists (`/v1/models`); UserError if it does not answer."""
    try:
        response = requests.get(url + "/v1/models", timeout=HEALTH_TIMEOUT)
        response.raise_for_status()
        return response.json()["data"][0]
    except (requests.RequestException, ValueError, KeyError, IndexError) as error:
        raise UserError(f"the server at {url} is not reachable or lists no model "
                        f"({type(error).__name__}); start it first or check the URL") from None


def healthy(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=HEALTH_TIMEOUT).status_code == 200
    except requests.RequestException:
        return False


def load_tokenizer(settings: Settings, targets: list[Target]):
    """The tokenizer that measures prompt lengths: `settings.tokenizer`, else the first target's."""
    from transformers import AutoTokenizer

    source = settings.tokenizer
    if source is None:
        first = targets[0]
        source = str(first.model_dir) if first.model_dir else served_model(first.url).get("root")
    if not source or not (Path(source).is_dir() or settings.tokenizer):
        raise UserError(f"cannot find the tokenizer of {targets[0].name}; pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a tokenizer from {source}: {str(error).splitlines()[0]}") from None


class Progress:
    """A one-line live status on stderr from locust's statistics (rewritten in place on a terminal)."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0
        self.step: tuple[str, str] | None = None

    def update(self, target: str, step: str, env: Environment, api: str, total: int | None, started: float,
               force: bool = False) -> None:
        now = time.monotonic()
        first = self.step != (target, step)  # the first line of every step shows at once
        if not (force or first) and now - self.last < (1.0 if self.tty else 15.0):
            return
        self.last, self.step = now, (target, step)
        e2e, ttft = env.stats.get("E2E", api), env.stats.get("TTFT", api)
        done = f"{e2e.num_requests}/{total}" if total else f"{e2e.num_requests}"
        line = (f"[{target} {step}] {done} requests, {e2e.num_failures} errors, {now - started:5.0f} s, "
                f"{e2e.num_requests / max(now - started, 1e-9):5.2f} req/s, "
                f"median TTFT {ttft.median_response_time or 0:.0f} ms, "
                f"median E2E {e2e.median_response_time or 0:.0f} ms")
        self.stream.write(("\r" + line.ljust(110)) if self.tty else line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")


class StepAborted(Exception):
    """The server of the current target went away during a step."""


def run_step(url: str, model: str, target: str, step: dict, prompts: list, settings: Settings,
             server: VllmServer | None, progress: Progress | None, count: int | None = None) -> tuple[list, float]:
    """Run one step with locust; return its records (in request order) and its duration in seconds.

    Raises `StepAborted` when the server dies; KeyboardInterrupt passes through. Either way the runner
    is stopped and the records so far are in the exception's `records` attribute.
    """
    count = count if count is not None else (None if settings.duration else settings.requests)
    arrivals = None
    if "rate" in step:
        arrival_count = count or min(MAX_REQUESTS_PER_STEP, int(step["rate"] * settings.duration * 2 + 100))
        arrivals = poisson_arrivals(step["rate"], arrival_count, settings.seed)
    users = step.get("concurrency") or settings.rate_max_concurrency
    plan = StepPlan(prompts, count, None if count else settings.duration, arrivals)
    user_class = type(f"{settings.api.title()}User", (StreamingUser,), {
        "plan": plan, "api": settings.api, "model": model, "host": url, "ignore_eos": settings.ignore_eos,
        "request_timeout": settings.request_timeout})
    records: list[RequestRecord] = []
    finished_at = [plan.start]

    def collect(context: dict, **_ignored) -> None:
        if "record" in context:
            records.append(context["record"])
            finished_at[0] = time.perf_counter()

    env = Environment(user_classes=[user_class], events=Events(), host=url)
    env.events.request.add_listener(collect)
    runner = env.create_local_runner()
    deadline = time.monotonic() + (settings.duration or MAX_STEP_SECONDS) + settings.request_timeout
    started = time.monotonic()
    checked_errors = 0
    try:
        runner.start(users, spawn_rate=100)  # locust warns above 100/s
        while not (plan.exhausted and len(records) == plan.dispatched):
            gevent.sleep(0.2)
            if progress:
                progress.update(target, step["label"], env, settings.api, count, started)
            if server is not None and not server.is_alive():
                raise StepAborted(f"the vLLM server of {target} exited (code {server.process.returncode}) "
                                  f"during step {step['label']}")
            failures = sum(1 for r in records if r.error and r.error.startswith("connection"))
            if failures > checked_errors:
                checked_errors = failures
                if not healthy(url):
                    raise StepAborted(f"the server of {target} stopped answering during step {step['label']}")
            if runner.exceptions:  # a bug in a user: locust logs it and the user loops; stop instead
                raise RuntimeError(f"load-test user failed:\n{next(iter(runner.exceptions.values()))['traceback']}")
            if time.monotonic() > deadline:
                raise StepAborted(f"step {step['label']} of {target} did not finish within its time bound")
    except (StepAborted, KeyboardInterrupt) as error:
        plan.stop()
        gevent.sleep(0.5)  # let requests that already failed report, so that the errors are counted
        runner.quit()
        error.records = sorted(records, key=lambda r: r.index)
        error.duration = finished_at[0] - plan.start
        error.unfinished = plan.dispatched - len(records)
        raise
    finally:
        if progress:
            progress.update(target, step["label"], env, settings.api, count, started, force=True)
            progress.end()
    runner.quit()
    return sorted(records, key=lambda r: r.index), finished_at[0] - plan.start


def step_result(step: dict, records: list[RequestRecord], duration: float, complete: bool,
                unfinished: int = 0) -> dict:
    return {**step, "complete": complete, "unfinished_requests": unfinished,
            "summary": summarize(records, duration), "records": [r.to_json() for r in records]}


def start_server(target: Target, settings: Settings, log_path: Path) -> VllmServer:
    args, env = settings.server_settings()
    extra = [*args, *target.serve_args]
    if "--served-model-name" not in extra:
        extra += ["--served-model-name", target.name]
    return VllmServer(target.model_dir, extra_args=extra, env=env, log_path=log_path,
                      startup_timeout=settings.startup_timeout)


def startup_failure(error: ServerError, server: VllmServer) -> str:
    """One line: why the server did not start, its last error line, and where its log is."""
    headline = str(error).splitlines()[0].removesuffix("; last log lines:").split("; log:")[0]
    lines = server.log_tail(200).splitlines()
    raised = [i for i, line in enumerate(lines) if re.match(r"[\w.]*(Error|Exception)\b|.*: error: ", line)]
    cause = ""
    if raised:  # the last exception line, and the indented detail line under it (pydantic puts the reason there)
        i = raised[-1]
        detail = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1][:1].isspace() else ""
        cause = f": {lines[i].strip()} {detail}".rstrip()[:400]
    return f"{headline}{cause} (log: {server.log_path.name} in the report folder)"


def run_target(target: Target, settings: Settings, prompts: list, warmup_prompts: list, logs_dir: Path,
               progress: Progress | None, result: dict) -> None:
    """Serve (if a folder), warm up and run every step of one target, filling `result` as it goes, so
    that an interrupted run still reports what was measured."""
    server, step = None, None
    try:
        if target.model_dir is not None:
            server = start_server(target, settings, logs_dir / f"server-{target.name}.log")
            result.update(server_command=server.command, server_env=settings.server_settings()[1],
                          server_log=server.log_path.name)
            say(f"starting vLLM for {target.name} ({target.model_dir}) ...")
            began = time.monotonic()
            try:
                server.start()
            except ServerError as error:
                result.update(status="failed", message=startup_failure(error, server))
                say(f"{target.name}: {result['message']}")
                return
            result["startup_s"] = round(time.monotonic() - began, 1)
            url = server.url
        else:
            url = target.url
        try:
            result["model"] = served_model(url)
        except UserError as error:
            result.update(status="failed", message=str(error))
            return
        model = result["model"]["id"]
        if settings.warmup_requests:
            users = min(settings.warmup_requests, max(settings.concurrency or [1]))
            warmup = {"label": "warm-up", "concurrency": users}
            records, _ = run_step(url, model, target.name, warmup, warmup_prompts, settings, server, progress,
                                  count=settings.warmup_requests)
            if not any(r.ok for r in records):
                result.update(status="failed", message=f"every warm-up request failed: {records[0].error}")
                return
        for step in settings.steps():
            try:
                records, duration = run_step(url, model, target.name, step, prompts, settings, server, progress)
            except StepAborted as error:
                result["steps"].append(step_result(step, error.records, error.duration, False, error.unfinished))
                result.update(status="failed", message=str(error))
                say(f"{target.name}: {error}; its remaining steps are skipped")
                return
            result["steps"].append(step_result(step, records, duration, True))
    except KeyboardInterrupt as interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the servers' stop short
        if step is not None and hasattr(interrupt, "records"):  # not during start-up or warm-up
            result["steps"].append(step_result(step, interrupt.records, interrupt.duration, False,
                                               interrupt.unfinished))
        result.update(status="interrupted", message="interrupted by the user (Ctrl-C)")
        raise
    finally:
        if server is not None:
            server.stop()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def execute(targets: list[Target], settings: Settings, out_dir: Path, overwrite: bool, show_progress: bool) -> Path:
    """`harness.run_loadtest` after its checks: measure every target, write the report, return its folder."""
    from loadtests.report import machine_info, write_report

    check_output_dir(out_dir, overwrite)

    def build(count: int, seed: int) -> list[prompt_sets.Prompt]:
        return prompt_sets.build_prompts(settings.prompts, tokenizer, count, settings.max_tokens, seed,
                                         settings.max_prompt_tokens)

    tokenizer = None
    if not prompt_sets.needs_tokenizer(settings.prompts):
        prompts = build(settings.requests, settings.seed)  # a bad file is reported before any server is asked
    for target in targets:
        if target.url is not None:
            served_model(target.url)  # reachable now; a URL that goes away later fails in its turn
    if prompt_sets.needs_tokenizer(settings.prompts):
        tokenizer = load_tokenizer(settings, targets)
        prompts = build(settings.requests, settings.seed)
    warmup_prompts = build(max(settings.warmup_requests, 1), settings.seed + 1)
    progress = Progress() if show_progress else None
    results = [{"name": t.name, "source": t.source, "kind": "url" if t.url else "folder",
                "serve_args": t.serve_args, "status": "not run", "message": None, "steps": []} for t in targets]
    machine_before = machine_info()
    interrupted = False
    # Ctrl-C reaches this (the main) greenlet from the hub, wherever the signal lands: Python's own
    # handler raises KeyboardInterrupt in whichever greenlet runs at that moment, and one raised in a
    # locust user greenlet was, rarely, lost (CI saw a run go on for over a minute after Ctrl-C).
    ctrl_c = gevent.signal_handler(signal.SIGINT, gevent.getcurrent().throw, KeyboardInterrupt)
    with tempfile.TemporaryDirectory(prefix="loadtest-logs-") as logs:
        try:
            for target, result in zip(targets, results):
                result["status"] = "ok"
                run_target(target, settings, prompts, warmup_prompts, Path(logs), progress, result)
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: the servers this run started are stopped; writing the partial report")
        finally:
            ctrl_c.cancel()  # the event loop then leaves SIGINT at the OS default: set it explicitly
            signal.signal(signal.SIGINT, signal.SIG_IGN if interrupted else signal.default_int_handler)
        report_dir = write_report(out_dir, overwrite, settings=settings, results=results, prompts=prompts,
                                  tokenizer=getattr(tokenizer, "name_or_path", None), interrupted=interrupted,
                                  machine_before=machine_before, logs_dir=Path(logs))
    say(f"report written to {report_dir}")
    if interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # ignored during the clean-up
        raise KeyboardInterrupt
    return report_dir


def worker_main(job_file: str, result_file: str) -> int:
    job = json.loads(Path(job_file).read_text())
    targets = [Target(**target) for target in job["targets"]]
    settings = Settings(**job["settings"])
    try:
        report_dir = execute(targets, settings, Path(job["out_dir"]), job["overwrite"], job["show_progress"])
    except UserError as error:
        Path(result_file).write_text(json.dumps({"error": str(error)}))
        return 2
    except KeyboardInterrupt:
        return 130
    Path(result_file).write_text(json.dumps({"report_dir": str(report_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(*sys.argv[1:3]))

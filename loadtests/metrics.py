"""Figures of one step from its per-request records: latency percentiles, throughput, errors.

Percentiles come from the exact per-request values (numpy, linear interpolation, the same as
`vllm bench serve`), not from locust's histogram, which rounds response times to two significant
digits (up to 5% off at 1000-1049 ms).
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from loadtests.records import RequestRecord

PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "itl", "tpot", "e2e")


def distribution(seconds: list[float]) -> dict:
    """Mean and percentiles in milliseconds (None when there are no values)."""
    values = np.asarray(seconds, dtype=np.float64) * 1000.0
    if values.size == 0:
        return {"count": 0, "mean_ms": None, **{f"p{p}_ms": None for p in PERCENTILES}}
    return {"count": int(values.size), "mean_ms": float(values.mean()),
            **{f"p{p}_ms": float(np.percentile(values, p)) for p in PERCENTILES}}


def latency_values(records: list[RequestRecord], name: str) -> list[float]:
    """Seconds of one latency kind over the successful requests (ITL: every gap of every request)."""
    ok = [r for r in records if r.ok]
    if name == "itl":
        return [gap for r in ok for gap in r.itl]
    return [value for r in ok if (value := getattr(r, name)) is not None]


def summarize(records: list[RequestRecord], duration: float) -> dict:
    """Every figure of one step. `duration`: from the step's start to its last response, in seconds."""
    ok = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return {
        "requests": len(records),
        "successful": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": dict(Counter(r.error.split(":")[0] for r in records if not r.ok)),
        "duration_s": duration,
        "requests_per_s": len(ok) / duration if duration > 0 else None,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration if duration > 0 else None,
        "mean_prompt_tokens": float(np.mean(prompt_tokens)) if prompt_tokens else None,
        "mean_output_tokens": output_tokens / len(ok) if ok else None,
        "max_late_s": max((r.late for r in records), default=0.0),
        **{name: distribution(latency_values(records, name)) for name in LATENCIES},
    }

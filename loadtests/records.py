"""What one request measured (no locust import here, so that reports and tests can use it freely)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """What one request measured. Times in seconds; `start` relative to the step's start."""
    index: int
    api: str
    start: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    late: float = 0.0  # how much later than scheduled it was sent (request-rate mode, all users busy)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, as `vllm bench serve` defines it."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return {"index": self.index, "api": self.api, "start_s": round(self.start, 6), "ttft_s": self.ttft,
                "e2e_s": self.e2e, "tpot_s": self.tpot, "itl_s": [round(x, 6) for x in self.itl],
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "late_s": round(self.late, 6), "error": self.error}

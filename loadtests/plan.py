"""When each request of a step is sent: the schedule its locust users share (no locust import here)."""
from __future__ import annotations

import time

import numpy as np


class StepPlan:
    """Which prompt each user sends next, and when: shared by the users of one step.

    Closed loop (concurrency mode): a request is due as soon as a user is free. Open loop (request-rate
    mode): request i is due at its Poisson arrival time; if every user is busy it is sent late, and the
    delay is recorded. Requests stop at `count`, or at `duration` seconds after the start.
    """

    def __init__(self, prompts: list, count: int | None, duration: float | None,
                 arrivals: list[float] | None = None):
        self.prompts = prompts
        self.count = count
        self.duration = duration
        self.arrivals = arrivals
        self.start = time.perf_counter()
        self.dispatched = 0
        self.stopped = False
        self.exhausted = False  # set once take() has answered None

    def take(self) -> tuple[int, float] | None:
        """The next request's index and due time (perf_counter), or None when the step has sent all."""
        index = self.dispatched
        if not (self.stopped or (self.count is not None and index >= self.count)
                or (self.arrivals is not None and index >= len(self.arrivals))):
            due = self.start + self.arrivals[index] if self.arrivals else time.perf_counter()
            if self.duration is None or max(due, time.perf_counter()) - self.start < self.duration:
                self.dispatched += 1
                return index, due
        self.exhausted = True
        return None

    def stop(self) -> None:
        self.stopped = True


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Send times (seconds from the start) of `count` requests arriving as a Poisson process of `rate`/s:
    exponential gaps from a seeded generator, so every target gets the same schedule."""
    return np.random.default_rng(seed).exponential(1.0 / rate, count).cumsum().tolist()

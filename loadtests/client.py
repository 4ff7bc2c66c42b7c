"""Locust users that send streaming OpenAI-API requests and time every token.

Why raw HTTP with a small server-sent-events parser, and not the `openai` client: the time of a token is
the time its bytes arrive. Here each network chunk is stamped the moment `requests` hands it over (vLLM
flushes one event per engine step), before any parsing; the `openai` client stamps after building a
pydantic object per chunk, and its chat stream opens with a role-only chunk that carries no token, a
common source of too-early TTFTs. `vllm bench serve` also parses raw SSE (aiohttp), which keeps the two
comparable. Locust's documented pattern for such custom clients is to fire `events.request` ourselves.

Token counting: requests ask vLLM for `return_token_ids`, so every chunk says how many tokens it
carries (it also makes vLLM send a chunk for tokens whose text is still empty). A chunk of k tokens that
arrives g seconds after the previous one contributes the inter-token latencies g, 0, ..., 0: the k
tokens reached the client together. So a request of n output tokens has n - 1 inter-token latencies
summing to E2E - TTFT. Servers that do not send token ids count one token per non-empty chunk.
Prompt and output token totals come from the server's `usage` (`stream_options.include_usage`).
"""
from __future__ import annotations

import json
import time

import gevent
import requests
from locust import User, constant, task
from locust.exception import StopUser

from loadtests.plan import StepPlan
from loadtests.records import RequestRecord

CONNECT_TIMEOUT = 5.0


def request_body(api: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True, "ignore_eos": ignore_eos}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def chunk_tokens(choice: dict) -> int:
    token_ids = choice.get("token_ids")
    if token_ids is not None:
        return len(token_ids)
    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
    return 1 if text else 0


def stream_request(session: requests.Session, base_url: str, api: str, body: dict, record: RequestRecord,
                   timeout: float) -> None:
    """Send one streaming request and fill `record` (times relative to the call); never raises for
    server or network failures: they become `record.error`."""
    sent = time.perf_counter()
    last_token_at = sent
    arrived_tokens = 0
    done = False
    try:
        with session.post(base_url + ENDPOINTS[api], json=body, stream=True,
                          timeout=(CONNECT_TIMEOUT, timeout)) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {response.text[:200].strip()}"
                return
            buffer = b""
            for chunk in response.iter_content(chunk_size=None):
                now = time.perf_counter()
                if now - sent > timeout:
                    record.error = f"timeout: no complete response after {timeout:.0f} s"
                    return
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    data = event.strip().removeprefix(b"data:").strip()
                    if not data or data.startswith(b":"):
                        continue
                    if data == b"[DONE]":
                        done = True
                        continue
                    message = json.loads(data)
                    if "error" in message:
                        record.error = f"server error: {str(message['error'])[:200]}"
                        return
                    tokens = sum(chunk_tokens(choice) for choice in message.get("choices") or [])
                    if tokens:
                        if record.ttft is None:
                            record.ttft = now - sent
                            record.itl.extend([0.0] * (tokens - 1))
                        else:
                            record.itl.extend([now - last_token_at] + [0.0] * (tokens - 1))
                        last_token_at = now
                        arrived_tokens += tokens
                    if usage := message.get("usage"):
                        record.prompt_tokens = usage.get("prompt_tokens")
                        record.output_tokens = usage.get("completion_tokens") or 0
    except requests.ConnectionError as error:
        record.error = f"connection error: {type(error).__name__}"
        return
    except requests.Timeout:
        record.error = f"timeout: no data for {timeout:.0f} s"
        return
    except (requests.RequestException, ValueError) as error:
        record.error = f"bad response: {type(error).__name__}: {str(error)[:200]}"
        return
    if not done:
        record.error = "stream ended before [DONE] (server died or closed the connection)"
    elif record.ttft is None:
        record.error = "no token received"
    else:
        record.output_tokens = record.output_tokens or arrived_tokens  # a server that sent no usage
        record.e2e = last_token_at - sent


class StreamingUser(User):
    """One virtual user: takes the plan's next request, sends it, waits for the last token, repeats.
    A harness makes a subclass per step with the class attributes below set."""
    abstract = True
    wait_time = constant(0)
    plan: StepPlan
    api: str = "completions"
    model: str = ""
    ignore_eos: bool = True
    request_timeout: float = 300.0

    def on_start(self) -> None:
        self.session = requests.Session()

    def on_stop(self) -> None:
        self.session.close()

    @task
    def send_next(self) -> None:
        job = self.plan.take()
        if job is None:
            raise StopUser()
        index, due = job
        if (wait := due - time.perf_counter()) > 0:
            gevent.sleep(wait)
        prompt = self.plan.prompts[index % len(self.plan.prompts)]
        record = RequestRecord(index=index, api=self.api, late=max(0.0, time.perf_counter() - due),
                               start=time.perf_counter() - self.plan.start)
        body = request_body(self.api, self.model, prompt.text, prompt.max_tokens, self.ignore_eos)
        stream_request(self.session, self.host, self.api, body, record, self.request_timeout)
        events = self.environment.events
        events.request.fire(request_type=self.api, name="E2E", response_time=(record.e2e or 0.0) * 1000,
                            response_length=record.output_tokens, context={"record": record},
                            exception=RuntimeError(record.error) if record.error else None)
        if record.ok:  # locust's own live statistics of TTFT, for the progress display
            events.request.fire(request_type=self.api, name="TTFT", response_time=record.ttft * 1000,
                                response_length=0, context={}, exception=None)

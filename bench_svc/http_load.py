"""The HTTP twin of load_generator.run_level: the same requests (prompts, seeds, temperature, lengths) sent as
streaming OpenAI completions (`/v1/completions`, server-sent events), through the `openai` client (the caller most
people point at a model server first) or a bare HTTP client (httpx2 and json: what the protocol itself costs,
without the `openai` client's per-event parsing). Records what the client sees, as the gRPC generator does.

Token counts come from the usage in each stream's final event (SSE events carry text, not token ids); the gap of an
event of k characters is split over k, which is exact for the character tokenizers the benchmarks use.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from typing import Callable

import httpx2
import openai

from bench_svc.load_generator import PROMPTS, LoadLevel, LoadResult, RequestRecord
from bench_svc.loopback import check_loopback
from model.field_checks import check_choice

__all__ = ["CLIENTS", "run_http_level"]

CLIENTS = ("openai", "raw")


def _one(client: openai.OpenAI, model: str, level: LoadLevel, n: int, stop: threading.Event) -> RequestRecord:
    """Mirrors load_generator._request: prompt n, temperature 0.8, seed n, level.max_new_tokens."""
    record = RequestRecord()
    start = last = time.perf_counter()
    try:
        stream = client.completions.create(
            model=model,
            prompt=PROMPTS[n % len(PROMPTS)],
            max_tokens=level.max_new_tokens,
            temperature=0.8,
            seed=n,
            stream=True,
            timeout=level.request_timeout_s,
        )
        with stream:
            for event in stream:
                if stop.is_set():
                    record.error = "cancelled"
                    break
                k = len(event.choices[0].text) if event.choices else 0
                if k:
                    last = record.arrived(k, start, last)
                if event.usage is not None:
                    record.tokens = event.usage.completion_tokens
    except openai.APIError as err:
        record.error = f"{type(err).__name__}: {err}"
    return record


def _one_raw(http: httpx2.Client, model: str, level: LoadLevel, n: int, stop: threading.Event) -> RequestRecord:
    """The same request as `_one`, read line by line with json.loads."""
    record = RequestRecord()
    body = {
        "model": model,
        "prompt": PROMPTS[n % len(PROMPTS)],
        "max_tokens": level.max_new_tokens,
        "temperature": 0.8,
        "seed": n,
        "stream": True,
    }
    start = last = time.perf_counter()
    try:
        with http.stream("POST", "/v1/completions", json=body, timeout=level.request_timeout_s) as reply:
            if reply.status_code != 200:
                record.error = f"HTTP {reply.status_code}: {reply.read()[:200]!r}"
                return record
            for line in reply.iter_lines():
                if stop.is_set():
                    record.error = "cancelled"
                    break
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = event["error"]["message"]
                    break
                k = len(event["choices"][0]["text"])
                if k:
                    last = record.arrived(k, start, last)
                if event.get("usage"):
                    record.tokens = event["usage"]["completion_tokens"]
    except httpx2.HTTPError as err:
        record.error = f"{type(err).__name__}: {err}"
    return record


def run_http_level(
    base_url: str,
    model: str,
    level: LoadLevel,
    stop: threading.Event | None = None,
    *,
    token: str = "",
    client: str = "openai",
) -> LoadResult:
    """Runs one load level against the OpenAI-compatible server at `base_url` (http://127.0.0.1:PORT, loopback only)
    with `client` "openai" (the openai package) or "raw" (httpx2 + json)."""
    check_choice("client", client, CLIENTS)
    check_loopback(base_url.removeprefix("http://").split("/")[0])
    stop = stop or threading.Event()
    counter = itertools.count()
    lock = threading.Lock()
    records: list[RequestRecord] = []
    if client == "openai":
        session = openai.OpenAI(base_url=f"{base_url}/v1", api_key=token or "unused", max_retries=0)
        send: Callable[[int], RequestRecord] = lambda n: _one(session, model, level, n, stop)  # noqa: E731
    else:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        session = httpx2.Client(base_url=base_url, headers=headers)
        send = lambda n: _one_raw(session, model, level, n, stop)  # noqa: E731
    start = time.perf_counter()

    def worker() -> None:
        while not stop.is_set() and time.perf_counter() - start < level.time_budget_s:
            with lock:
                n = next(counter)
            if n >= level.requests:
                return
            record = send(n)
            with lock:
                records.append(record)

    with session:
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(level.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return LoadResult(level, tuple(records), time.perf_counter() - start)

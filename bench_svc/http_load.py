"""The HTTP twin of load_generator.run_level: the same requests (prompts, seeds, temperature, lengths) sent as
streaming OpenAI completions (`/v1/completions`, server-sent events) through the `openai` client, the caller most
people point at a model server first. Records what the client sees, as the gRPC generator does.

Token counts come from the usage in each stream's final event (SSE events carry text, not token ids); the gap of an
event of k characters is split over k, which is exact for the character tokenizers the benchmarks use.
"""

from __future__ import annotations

import itertools
import threading
import time

import openai

from bench_svc.load_generator import PROMPTS, LoadLevel, LoadResult, RequestRecord
from bench_svc.loopback import check_loopback

__all__ = ["run_http_level"]


def _one(client: openai.OpenAI, model: str, level: LoadLevel, n: int, stop: threading.Event) -> RequestRecord:
    """Mirrors load_generator._request: prompt n, temperature 0.8, seed n, level.max_new_tokens."""
    record = RequestRecord()
    start = last = time.perf_counter()
    try:
        stream = client.completions.create(
            model=model, prompt=PROMPTS[n % len(PROMPTS)], max_tokens=level.max_new_tokens, temperature=0.8, seed=n,
            stream=True, timeout=level.request_timeout_s,
        )
        with stream:
            for event in stream:
                if stop.is_set():
                    record.error = "cancelled"
                    break
                k = len(event.choices[0].text) if event.choices else 0
                if k:
                    now = time.perf_counter()
                    if record.ttft_s is None:
                        record.ttft_s = now - start
                    else:
                        record.inter_token_s.extend([(now - last) / k] * k)
                    last = now
                if event.usage is not None:
                    record.tokens = event.usage.completion_tokens
    except openai.APIError as err:
        record.error = f"{type(err).__name__}: {err}"
    return record


def run_http_level(base_url: str, model: str, level: LoadLevel, stop: threading.Event | None = None, *, token: str = "") -> LoadResult:
    """Runs one load level against the OpenAI-compatible server at `base_url` (http://127.0.0.1:PORT, loopback only)."""
    check_loopback(base_url.removeprefix("http://").split("/")[0])
    stop = stop or threading.Event()
    counter = itertools.count()
    lock = threading.Lock()
    records: list[RequestRecord] = []
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=token or "unused", max_retries=0)
    start = time.perf_counter()

    def worker() -> None:
        while not stop.is_set() and time.perf_counter() - start < level.time_budget_s:
            with lock:
                n = next(counter)
            if n >= level.requests:
                return
            record = _one(client, model, level, n, stop)
            with lock:
                records.append(record)

    with client:
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(level.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return LoadResult(level, tuple(records), time.perf_counter() - start)

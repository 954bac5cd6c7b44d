"""A bounded gRPC load generator for an InferenceService: N concurrent streaming clients, client-side timings.

Each of `concurrency` threads sends `Generate` requests one after another over one shared channel until the
level's request count or time budget is spent. For every request it records, as the client sees them: the time
to the first token (TTFT), the gaps between later tokens (a chunk of k tokens after a gap g counts as k gaps of g/k),
the tokens received and whether it failed. The generator only talks to loopback addresses: it is a benchmark of
a local server, not a tool to load somebody else's.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from bench_svc.loopback import check_loopback
from model.field_checks import check_int, check_number
from protos import inference_pb2, inference_pb2_grpc
from rpc.client import channel

__all__ = ["LoadLevel", "LoadResult", "RequestRecord", "percentile", "run_level"]

PROMPTS = ("ROMEO:", "JULIET:\nO ", "First Citizen:\n", "KING HENRY:\nOnce more ", "To be, or not ", "MENENIUS:\nWhat ")


@dataclass(frozen=True)
class LoadLevel:
    """One load level: how many clients, how many requests in all, how long at most, and what each asks."""

    concurrency: int
    requests: int  # total over all clients
    max_new_tokens: int
    time_budget_s: float  # no new request starts after this; running ones finish (within request_timeout_s)
    request_timeout_s: float = 120.0  # gRPC deadline of each request
    model_id: str = ""  # empty: the server's default model

    def __post_init__(self) -> None:
        check_int("concurrency", self.concurrency, 1)
        check_int("requests", self.requests, self.concurrency, note=" (concurrency)")
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_number("time_budget_s", self.time_budget_s, 0, lo_open=True)
        check_number("request_timeout_s", self.request_timeout_s, 0, lo_open=True)


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    ttft_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""

    def arrived(self, k: int, start: float, last: float) -> float:
        """Record k tokens arriving now: the first batch sets TTFT (from `start`; tokens that came with the first one
        have no gap of their own), a later one spreads the gap since `last` over its k tokens. Returns now."""
        now = time.perf_counter()
        if self.ttft_s is None:
            self.ttft_s = now - start
        else:
            self.inter_token_s.extend([(now - last) / k] * k)
        return now


@dataclass(frozen=True)
class LoadResult:
    """The records of one level and its wall time."""

    level: LoadLevel
    records: tuple[RequestRecord, ...]
    wall_s: float

    @property
    def errors(self) -> int:
        return sum(1 for r in self.records if r.error)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)

    def summary(self) -> dict[str, float]:
        """The level's row: throughput and TTFT / inter-token latency percentiles in milliseconds."""
        ok = [r for r in self.records if not r.error]
        ttft = [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None]
        itl = [g * 1e3 for r in ok for g in r.inter_token_s]
        row = {
            "concurrency": self.level.concurrency,
            "requests": len(self.records),
            "errors": self.errors,
            "tokens": self.tokens,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens / self.wall_s if self.wall_s > 0 else 0.0,
            "requests_per_s": len(ok) / self.wall_s if self.wall_s > 0 else 0.0,
        }
        for name, values in (("ttft", ttft), ("itl", itl)):
            for q in (50, 95, 99):
                row[f"{name}_p{q}_ms"] = percentile(values, q)
        return row


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _request(level: LoadLevel, n: int) -> inference_pb2.GenerateRequest:
    params = inference_pb2.SamplingParameters(
        max_new_tokens=level.max_new_tokens, temperature=0.8, has_temperature=True, seed=n, has_seed=True
    )
    request = inference_pb2.GenerateRequest(prompt=PROMPTS[n % len(PROMPTS)], params=params, request_id=f"bench-{n}")
    if level.model_id:
        request.model.id = level.model_id
    return request


def _one(
    stub: inference_pb2_grpc.InferenceServiceStub, level: LoadLevel, n: int, stop: threading.Event
) -> RequestRecord:
    record = RequestRecord()
    start = last = time.perf_counter()
    call = stub.Generate(_request(level, n), timeout=level.request_timeout_s)
    try:
        for chunk in call:
            if stop.is_set():
                call.cancel()
                record.error = "cancelled"
                break
            k = len(chunk.token_ids)
            if k:
                last = record.arrived(k, start, last)
                record.tokens += k
            if chunk.finish_reason == inference_pb2.FINISH_REASON_ERROR:
                record.error = chunk.error or "FINISH_REASON_ERROR"
    except grpc.RpcError as err:
        record.error = f"{err.code().name}: {err.details()}"
    return record


def run_level(
    address: str, level: LoadLevel, stop: threading.Event | None = None, *, token: str | None = None
) -> LoadResult:
    """Runs one load level against the InferenceService at `address` (loopback only); `stop` ends it early."""
    check_loopback(address)
    stop = stop or threading.Event()
    counter = itertools.count()
    lock = threading.Lock()
    records: list[RequestRecord] = []
    start = time.perf_counter()

    def client(stub: inference_pb2_grpc.InferenceServiceStub) -> None:
        while not stop.is_set() and time.perf_counter() - start < level.time_budget_s:
            with lock:
                n = next(counter)
            if n >= level.requests:
                return
            record = _one(stub, level, n, stop)
            with lock:
                records.append(record)

    with channel(address, token=token) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        threads = [threading.Thread(target=client, args=(stub,), daemon=True) for _ in range(level.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return LoadResult(level, tuple(records), time.perf_counter() - start)

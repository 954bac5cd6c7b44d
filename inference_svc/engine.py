"""The serving engine: a background loop that runs continuous batching over a model runner.

`submit(request)` queues a request and returns a `RequestHandle` whose iterator yields `Chunk`s as tokens
come: token ids and their text, then a final chunk with the finish reason, token counts and timings.
Each loop step the scheduler frees cancelled sequences, admits waiting ones into free slots, the runner
prefills the new ones and decodes one token for the rest. With a `TorchRunner` the loop is device-resident: the
runner samples inside its captured step and keeps each slot's next input on the device, and the engine launches
step n before it streams step n-1's tokens (one pinned copy and one event per step), so the host's work overlaps
the GPU's. Other runners (ONNX Runtime) and speculative decoding hand back logits, which `Sampler` turns into
tokens with one host sync per step (vLLM's LLMEngine.step, in one thread).
"""

from __future__ import annotations

import enum
import gc
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, NamedTuple

import torch

from inference_svc.detokenizer import StreamingDetokenizer
from inference_svc.kv_pool import KVPool
from inference_svc.params import Request
from inference_svc.runner import MAX_DECODE_STEPS, MULTI_STEP_GRAPH_MAX_BATCH, ModelRunner
from inference_svc.sampler import Sampler
from inference_svc.scheduler import QueueFull, Scheduler
from inference_svc.sequence import Sequence, SequenceStatus
from inference_svc.speculative import SpeculativeDecoder
from inference_svc.speculative_resident import SpeculativeRunner
from model.field_checks import check_int
from model.sampling import request_seed
from model.tokenizers import Tokenizer, piece_texts

__all__ = [
    "Chunk",
    "DecodeSteps",
    "Engine",
    "EngineStats",
    "FinishReason",
    "QueueFull",
    "RequestHandle",
    "Timings",
    "Usage",
    "prepared",
]

log = logging.getLogger(__name__)

# Decode steps launched per engine step on the device-resident loop with CUDA graphs (vLLM's multi-step scheduling;
# at small batch one graph holds them all, `TorchRunner.decode_sample(steps=)`): each step leaves its tokens as the
# next one's input on the device, so the host pays its per-step costs (scheduling, the graph launch, the ids' copy
# and event, the streams' wake-ups and the GIL hand-overs they cause) once per `decode_steps` tokens; a row's tokens
# of one engine step reach its stream as one chunk. The price: a request arriving meanwhile waits for the launched
# steps (4 x ~0.1-0.3 ms), and a row ended by a stop string may have up to `decode_steps` tokens computed for
# nothing. H200, tools.serve_probe (under the profiler), 1 -> 4 steps: 256 rows 258k -> 614k tokens/s; batch 1
# 0.180 -> 0.167 ms/token with single-step graphs (a graph launch ~40 us of host time, the GPU idle ~35%).
DECODE_STEPS_GRAPHS = 4
# At small batches (up to MULTI_STEP_GRAPH_MAX_BATCH rows, where one graph holds an engine step's decode steps) a step
# on the GPU is short (~0.1 ms at batch 1 on the H200) and the engine step's host costs (the graph launch ~40-48 us,
# the event sync, the engine's Python: ~0.12 ms) are most of each token's time, so more steps per launch pay: 8 there
# (batch 1 at 4 steps: 0.128 ms/token against the graph's 0.097). Above it a step is long enough to hide more of the
# host's work, and a request arriving waits for the steps in flight: 4.
DECODE_STEPS_SMALL_BATCH = 8


@dataclass(frozen=True)
class DecodeSteps:
    """Decode steps per engine step as a function of the running batch: `small` for batches up to `small_max_batch`
    rows, `large` above. `DecodeSteps.fixed(k)`: k at every batch."""

    small: int = DECODE_STEPS_SMALL_BATCH
    large: int = DECODE_STEPS_GRAPHS
    small_max_batch: int = MULTI_STEP_GRAPH_MAX_BATCH

    def __post_init__(self) -> None:
        check_int("decode_steps.small", self.small, 1, MAX_DECODE_STEPS)
        check_int("decode_steps.large", self.large, 1, MAX_DECODE_STEPS)
        check_int("decode_steps.small_max_batch", self.small_max_batch, 0)

    @classmethod
    def fixed(cls, steps: int) -> "DecodeSteps":
        check_int("decode_steps", steps, 1, MAX_DECODE_STEPS)
        return cls(steps, steps, 0)

    def __call__(self, batch: int) -> int:
        """The steps an engine step launches for `batch` running rows."""
        return self.small if batch <= self.small_max_batch else self.large

    @property
    def most(self) -> int:
        return max(self.small, self.large)


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_new_tokens or the context length reached
    STOP = "stop"  # a stop sequence was generated
    CANCELLED = "cancelled"  # the caller cancelled or went away, or the engine shut down
    ERROR = "error"  # the runner or sampler failed; `Chunk.error` says why


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Milliseconds, measured from the request's arrival at `submit`."""

    ttft_ms: float  # to the first generated token (0 when none was generated)
    mean_inter_token_ms: float  # mean gap between generated tokens after the first
    total_ms: float  # to the final chunk
    queue_ms: float  # waiting for a slot
    token_ms: tuple[float, ...]  # arrival of each generated token


class Chunk(NamedTuple):
    """A piece of a streamed generation; the last one has `finish_reason` set (and may carry tokens too).
    A NamedTuple: the engine makes one per token per request, so construction cost matters."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: str = ""

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """Occupancy, for load reports and leak tests (idle engine: free_slots == max_slots, the rest 0)."""

    max_slots: int
    free_slots: int
    queued: int
    running: int
    in_flight: int  # handles not yet given their final chunk
    finished: dict[str, int]  # requests ended so far, by finish reason ("length", "stop", "cancelled", "error")
    draft_proposed: int = 0  # speculative decoding: draft tokens proposed and accepted so far
    draft_accepted: int = 0
    loop: "LoopClock | None" = None  # the device-resident loop's host time so far, by part (a copy)


@dataclass
class LoopClock:
    """Where the device-resident loop's host time goes, summed over its iterations (`Engine.stats().loop`): a
    diagnostic for the batch-1 latency (tools.serve_probe), ~4 clock reads per iteration. `wait_s` is time blocked on
    a launched step's event: near 0 means the host is the bound (the GPU idles between launches), near the wall
    time per launch that the GPU is."""

    iterations: int = 0  # engine steps that launched work
    launch_s: float = 0.0  # scheduling and launching (prefills, decode graphs, the ids' copies)
    wait_s: float = 0.0  # blocked until a launched step's ids are on the host
    stream_s: float = 0.0  # handing tokens to their streams (detokenizing, chunks, queues)


class RequestHandle:
    """A submitted request: iterate it for its chunks (ends after the final one), or `result()`."""

    def __init__(self, engine: "Engine", request_id: str, sink: "queue.SimpleQueue[Chunk]") -> None:
        self.engine = engine
        self.request_id = request_id
        self._sink = sink
        self._done = False

    def next_chunk(self, timeout: float | None = None) -> Chunk | None:
        """The next chunk, or None if none came within `timeout` seconds (or the stream already ended)."""
        if self._done:
            return None
        try:
            chunk = _as_chunk(self._sink.get(timeout=timeout))
        except queue.Empty:
            return None
        self._done = chunk.final
        return chunk

    def ready(self) -> bool:
        """Whether a chunk is waiting (`next_chunk` would return at once); a cheap check for pollers."""
        return not self._done and not self._sink.empty()

    def next_chunks(self, timeout: float | None = None) -> list[Chunk]:
        """The next chunk and every chunk already waiting behind it, up to the final one (empty if none came
        within `timeout`): one call for a burst of tokens."""
        first = self.next_chunk(timeout)
        if first is None:
            return []
        chunks, sink = [first], self._sink
        while not self._done and not sink.empty():  # the engine thread only adds: what is there stays
            chunk = _as_chunk(sink.get_nowait())
            self._done = chunk.final
            chunks.append(chunk)
        return chunks

    def __iter__(self) -> Iterator[Chunk]:
        while (chunk := self.next_chunk()) is not None:
            yield chunk

    def cancel(self) -> bool:
        return self.engine.cancel(self.request_id)

    def result(self) -> Chunk:
        """Wait for the end; one chunk holding every token id, the whole text and the final fields."""
        ids: list[int] = []
        text: list[str] = []
        for chunk in self:
            ids.extend(chunk.token_ids)
            text.append(chunk.text)
        return chunk._replace(token_ids=tuple(ids), text="".join(text))


class Engine:
    """Continuous batching over `runner` with up to `max_slots` running and `max_queue` waiting requests.

    The loop thread starts at construction; `close()` (or leaving a `with` block) stops it and cancels
    whatever is still in flight. `resident` (default: whenever the runner offers it) runs the device-resident
    loop (`TorchRunner.prefill_sample` / `decode_sample`: sampling on the device, each step launched before the
    previous step's tokens are streamed); False keeps the logits path (runner logits, then `Sampler`). With a
    `draft` runner (a smaller model with the same tokenizer), decode steps are speculative: the draft proposes `speculative_k` tokens per sequence and the target verifies them in one
    step (inference_svc.speculative); the output keeps the target's distribution. `speculative_k` 3 by default (H200,
    thirteenth session: k = 3 ahead of k = 4 in 8 of 12 rows over three runs, its worst row 1.01x against k = 4's 0.80x). `draft_kernel` (resident loop only):
    a round's draft steps in one launch (`SpeculativeRunner`; off: it lost on the H200); `accept_kernel` (default: on
    with a draft, the kernel on CUDA; False: its torch reference): a sampled round's acceptance (the target's
    distributions, the rejection tests, the new token) in one launch (H200, twelfth session: -0.09 / -0.10 ms a sampled
    round at batch 1 / 16);
    `verify_kernels` (default: on with a draft): the target's verify on its small-batch decode kernels where the round's
    rows fit (H200, thirteenth session: -0.004 to -0.02 ms a round, every row faster).
    `carry_draft` (default): the draft loop runs k forwards a round, d_k's keys and values written by the next round's
    first step, while its 2b rows fit the small-batch kernels (b <= 8; False, or more rows: k + 1, the last for them
    alone). `sample_kernels` (default: on with a draft): a sampled round's uniforms and each draft step's draw in one
    launch each (`kernels.accept_round.uniform_grid`, `draft_sample`; a greedy draft step's argmax too). `finish_kernel`
    (default: on with a draft, the kernel on CUDA; False: its torch reference): a round's tail in one launch
    (`kernels.accept_round.finish_round`: a greedy round's argmax and acceptance, then the slot state and the round's
    output; H200, thirteenth session: -0.025 ms a batch-1 greedy round, 0.83x -> 0.87x). On
    the resident loop a prompt longer than `prefill_chunk` tokens is prefilled a chunk per step, interleaved with the
    running streams' decode.
    `decode_steps`: decode steps launched per engine step on the resident loop, a number or a `DecodeSteps` (by running
    batch); default by batch with CUDA graphs (`DecodeSteps()`), else 1. A request's first token (sampled by its
    prefill) is streamed as soon as it is on the host, while the decode steps launched behind it run.
    """

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        max_slots: int | None = None,
        max_queue: int = 1024,
        *,
        max_prefill_tokens: int = 8192,
        draft: ModelRunner | None = None,
        speculative_k: int = 3,
        draft_kernel: bool | str = False,
        accept_kernel: bool | str | None = None,
        verify_kernels: bool | None = None,
        carry_draft: bool = True,
        sample_kernels: bool | str | None = None,
        finish_kernel: bool | str | None = None,
        resident: bool | None = None,
        prefill_chunk: int = 512,
        decode_steps: int | DecodeSteps | None = None,
    ) -> None:
        max_slots = runner.n_slots if max_slots is None else max_slots
        check_int("max_slots", max_slots, 1, runner.n_slots, note=" (the runner's slots)")
        check_int("prefill_chunk", prefill_chunk, 1)
        self.prefill_chunk = prefill_chunk
        if decode_steps is None:  # by batch on CUDA graphs; 1 elsewhere (no launch cost to spread)
            decode_steps = DecodeSteps() if getattr(runner, "cuda_graphs", False) else 1
        if not isinstance(decode_steps, DecodeSteps):
            decode_steps = DecodeSteps.fixed(decode_steps)
        self.steps_for = decode_steps  # the decode steps an engine step launches, by running batch
        self.decode_steps = decode_steps.most  # the most an engine step launches
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_slots = max_slots
        self.scheduler = Scheduler(KVPool(max_slots), max_queue, max_prefill_tokens)
        self.sampler = Sampler(runner.device, vocab_size=tokenizer.vocab_size)
        # The device-resident loop (a runner that samples on the device and keeps each slot's next input there):
        # each step is launched before the previous step's tokens are read. With a draft on it, the engine drives
        # both models through one `SpeculativeRunner` (prefills into both, speculative rounds on the device).
        can = hasattr(runner, "decode_sample") and (draft is None or hasattr(draft, "decode_sample"))
        if resident and not can:
            raise ValueError("resident=True needs a runner with decode_sample (TorchRunner), and a draft with it too")
        self._resident = can if resident is None else resident
        self.speculative: SpeculativeDecoder | SpeculativeRunner | None = None
        # The round's options as given; those left None take SpeculativeRunner's defaults.
        options = dict(
            draft_kernel=draft_kernel,
            accept_kernel=accept_kernel,
            verify_kernels=verify_kernels,
            sample_kernels=sample_kernels,
            finish_kernel=finish_kernel,
        )
        for name, option in options.items():
            if option and not (draft is not None and self._resident):
                raise ValueError(f"{name} needs a draft on the resident loop (a TorchRunner target and draft)")
        if draft is not None and self._resident:
            given = {name: option for name, option in options.items() if option is not None}
            self.runner = self.speculative = SpeculativeRunner(
                runner, draft, speculative_k, max_slots, carry_draft=carry_draft, **given
            )
        elif draft is not None:
            self.speculative = SpeculativeDecoder(
                runner, draft, speculative_k, vocab_size=tokenizer.vocab_size, max_slots=max_slots
            )
        self._wake = threading.Condition()
        self._closing = False
        self._sinks: dict[str, queue.SimpleQueue[Chunk]] = {}
        self._finished = {reason.value: 0 for reason in FinishReason}
        # Called on the engine thread with every final chunk, before its caller sees it (metrics); keep them cheap.
        self.finish_listeners: list[Callable[[Chunk], None]] = []
        # Called on the engine thread after every step and after the shutdown's last chunks (an engine process sends
        # what the step put in its outbox as one message).
        self.step_listeners: list[Callable[[], None]] = []
        if self._resident:
            self.runner.state.allow(tokenizer.vocab_size)
            self.runner.capture_graphs(steps=decode_steps)  # every decode graph now (each step count a batch bucket
            # will launch), not on a request's time
        piece_texts(tokenizer)  # the per-id text table the detokenizers share: built now, not on a request's time
        self._in_flight: deque[_Launched] = deque()  # steps launched whose tokens are not streamed yet
        self.loop_clock = LoopClock()
        # a step's new ids: the prefilled rows' (one each), the decode rows' (decode_steps each), the speculative rounds'
        # (count and k + 1 ids each)
        per_row = 1 + max(self.decode_steps, speculative_k + 2 if draft is not None else 0)
        # A runner may mark the end of its launched work itself (`record_event()`: an object whose `synchronize()`
        # waits for it; tools.grpc_probe's simulated device); on CUDA a CUDA event, elsewhere the work is done.
        marks = getattr(runner, "record_event", None)
        self._outputs = _OutputRing(runner.device, per_row * max_slots, marks) if self._resident else None
        # What exists now (modules, the model, its graphs) lives as long as the server: moved out of the collector's
        # view, a full collection looks at the requests' objects only. Over a server's ~400k objects one took
        # ~0.2-0.4 s, a stall of every stream (tools.serve_probe on this loop: ~3 ms once frozen).
        gc.freeze()
        self._thread = threading.Thread(target=self._loop, name="tinylm-engine", daemon=True)
        self._thread.start()

    # Caller side --------------------------------------------------------------------------------------

    def submit(self, request: Request) -> RequestHandle:
        """Queue a request (a fresh request_id is made when empty). Raises QueueFull when the waiting
        queue is full, ValueError on a request_id already in flight or a prompt beyond the runner's context,
        RuntimeError once the engine is closed."""
        return self.submit_many([request])[0]

    def submit_many(self, requests: list[Request], *, sink: Any = None) -> list[RequestHandle]:
        """Queue several requests at once, all or none (the errors of `submit`; QueueFull when they do not all
        fit). They reach the loop together, so its next step admits them in one batch, where requests submitted
        one by one from a busy thread trickle in over many steps. `sink`: one queue (anything with `put`) for all
        their chunks, each carrying its request id first, instead of a queue each (an engine process's outbox,
        inference_svc.engine_process); the handles then read that shared queue."""
        seqs, sinks = [], []
        arrived = time.perf_counter()  # one arrival for all: timings count from it
        for request in prepared(requests, self.runner.max_len):
            seqs.append(
                Sequence(
                    request=request,
                    detokenizer=StreamingDetokenizer(self.tokenizer, request.params.stop),
                    # Speculative decoding's draws only (a device generator costs tens of us to make).
                    generator=self.sampler.generator(request.params.seed)
                    if self.speculative and not self._resident
                    else None,
                    sink=queue.SimpleQueue() if sink is None else sink,
                    seed=request_seed(request.params),
                    arrived_at=arrived,
                )
            )
            seqs[-1].length_limit = min(request.params.max_new_tokens, self.runner.max_len - seqs[-1].prompt_len + 1)
            sinks.append(seqs[-1].sink)
        with self._wake:
            if self._closing:
                raise RuntimeError("the engine is closed")
            self.scheduler.add_many(seqs)  # QueueFull / duplicate id: nothing was registered
            for seq, sink in zip(seqs, sinks):
                self._sinks[seq.request_id] = sink
            self._wake.notify()
        return [RequestHandle(self, seq.request_id, sink) for seq, sink in zip(seqs, sinks)]

    def cancel(self, request_id: str) -> bool:
        """Cancel a queued or running request; its slot is freed and its final chunk (CANCELLED) sent by
        the next engine step. False when it is not in flight (finished already, or unknown)."""
        with self._wake:
            found = self.scheduler.abort(request_id)
            self._wake.notify()
        return found

    def stats(self) -> EngineStats:
        with self._wake:
            return EngineStats(
                max_slots=self.max_slots,
                free_slots=self.scheduler.pool.n_free,
                queued=self.scheduler.n_waiting,
                running=self.scheduler.n_running,
                in_flight=len(self._sinks),
                finished=dict(self._finished),
                draft_proposed=self.speculative.stats.proposed if self.speculative else 0,
                draft_accepted=self.speculative.stats.accepted if self.speculative else 0,
                loop=replace(self.loop_clock) if self._resident else None,
            )

    def close(self) -> None:
        """Stop the loop; requests still in flight end CANCELLED."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Engine thread ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self.scheduler.has_work() and not self._in_flight:
                    self._wake.wait()
                if self._closing:
                    break
            try:
                self.step()
            except Exception:  # a bookkeeping bug must not silently stop the server's only loop
                log.exception("engine step failed")
            self._step_done()
        self._in_flight.clear()
        for seq in self.scheduler.drain():
            self._finish(seq, FinishReason.CANCELLED, error="the engine shut down")
        self._step_done()

    def _step_done(self) -> None:
        for listener in self.step_listeners:
            try:
                listener()
            except Exception:
                log.exception("step listener failed")

    def step(self) -> None:
        """One iteration: free cancelled, admit, prefill the admitted, decode the rest, stream tokens."""
        if self._resident:
            self._step_resident()
            return
        out = self.scheduler.schedule()
        for seq in out.aborted:
            self._finish(seq, FinishReason.CANCELLED)
        if out.prefill:
            self._run(out.prefill, prefill=True)
        decode, rounds = out.decode, []
        if self.speculative is not None:  # sequences near the end of a context stay on plain steps
            decode, rounds = [], []
            for seq in out.decode:
                (rounds if self.speculative.eligible(seq) else decode).append(seq)
        if rounds:
            self._run(rounds, speculative=True)
        if decode:
            self._run(decode)

    def _run(self, seqs: list[Sequence], *, prefill: bool = False, speculative: bool = False) -> None:
        """Prefill the admitted, decode one token each, or run a speculative round (1..k+1 tokens each); stream
        the new tokens."""
        slots = [seq.slot for seq in seqs]
        try:
            if speculative:
                new_tokens = self.speculative.step(seqs)
            else:
                if prefill:
                    _mark_admitted(seqs)
                    logits = self.runner.prefill(slots, [seq.request.prompt_ids for seq in seqs])  # (B, V)
                else:
                    tokens = [seq.last_token for seq in seqs]
                    logits = self.runner.decode(slots, tokens, [seq.length - 1 for seq in seqs])  # (B, V)
                new_tokens = [[token] for token in self.sampler.sample(logits, seqs)]
        except Exception as err:
            self._isolate(seqs, err, lambda one: self._run(one, prefill=prefill, speculative=speculative))
            return
        now = time.perf_counter()
        for seq, tokens in zip(seqs, new_tokens):
            try:
                for token in tokens:  # streamed one by one; a stop string or the length limit ends it early
                    self._append(seq, token, now)
                    if seq.status is SequenceStatus.FINISHED:
                        break
            except Exception as err:  # e.g. the tokenizer refusing a token: fail this request only
                self._fail(seq, err, f"on token {token}")

    # The device-resident loop --------------------------------------------------------------------------

    def _step_resident(self) -> None:
        """Launch this step (prefill the admitted, then `decode_steps` decode steps of the running: each samples on
        the device and leaves its token as the slot's next input), then stream the previous step's tokens while the
        GPU runs this one. A sequence is launched only while it still needs tokens (max_new_tokens, context
        length); one that a stop string ends may have tokens in flight, which are dropped."""
        began = time.perf_counter()
        out = self.scheduler.schedule()
        for seq in out.aborted:
            self._finish(seq, FinishReason.CANCELLED)
        chunk = self.prefill_chunk
        decode = [s for s in out.decode if 0 < s.launched < s.length_limit]  # max_new_tokens, or the context's end
        # Prompts still being prefilled (admitted now, or earlier with a prompt longer than a chunk): a long prompt
        # goes in `prefill_chunk` tokens per step, so the running streams keep decoding meanwhile.
        prefill = [s for s in out.decode if s.launched == 0] + out.prefill
        last = [s for s in prefill if s.prompt_len - s.prefilled <= chunk]
        partial = [s for s in prefill if s.prompt_len - s.prefilled > chunk]
        ids = self._outputs.open()
        if partial:
            self._prefill_chunks(partial)
        if last:
            self._launch_prefill(last, ids)
        # The prefills' first tokens, with an event of their own: streamed once they are on the host, not after the
        # decode steps launched behind them (4-8 steps of the running batch: the TTFT of every request admitted now).
        first = ids.cut() if ids.groups else None
        if decode and isinstance(self.speculative, SpeculativeRunner):  # rounds where they fit, plain steps after
            decode = self._launch_rounds(decode, ids)
        if decode:  # the batch's steps (`steps_for`), at most as many as the row with the fewest tokens left needs
            steps = min(self.steps_for(len(decode)), min(s.length_limit - s.launched for s in decode))
            self._launch_decode(decode, ids, steps)
        launched = ids.close() if ids.groups else None
        if launched is None:  # nothing launched behind the prefills: they are the step kept running, as any step
            launched, first = first, None
        if launched is not None:
            self._in_flight.append(launched)
            self.loop_clock.iterations += 1
        self.loop_clock.launch_s += time.perf_counter() - began
        while len(self._in_flight) > (1 if launched is not None else 0):  # keep the step just launched running
            self._stream(self._in_flight.popleft())
        if first is not None:  # after the earlier steps' tokens (each stream's order), while the decode steps run
            self._stream(first)

    def _prefill_chunks(self, seqs: list[Sequence]) -> None:
        """The next `prefill_chunk` tokens of each long prompt into its slot (no token comes out yet)."""
        _mark_admitted(seqs)
        try:
            chunks = [s.request.prompt_ids[s.prefilled : s.prefilled + self.prefill_chunk] for s in seqs]
            self.runner.extend([s.slot for s in seqs], chunks, [s.prefilled for s in seqs])
        except Exception as err:
            self._isolate(seqs, err, self._prefill_chunks)
            return
        for seq in seqs:
            seq.prefilled += self.prefill_chunk

    def _launch_prefill(self, seqs: list[Sequence], ids: "_HostIds") -> None:
        _mark_admitted(seqs)
        try:
            tokens = self.runner.prefill_sample(
                [s.slot for s in seqs],
                [s.request.prompt_ids for s in seqs],
                [s.request.params for s in seqs],
                [s.seed for s in seqs],
                [s.prefilled for s in seqs],
            )
        except Exception as err:
            self._isolate(seqs, err, lambda one: self._launch_prefill(one, ids))
            return
        for seq in seqs:
            seq.launched, seq.prefilled = 1, seq.prompt_len
        ids.add(tokens)
        ids.groups.append((seqs, 1))

    def _launch_decode(self, seqs: list[Sequence], ids: "_HostIds", steps: int) -> None:
        kv_len = max(s.prompt_len + s.launched for s in seqs)  # the fed token sits at prompt_len + launched - 1
        full = not all(s.greedy_plain for s in seqs)
        try:
            tokens = self.runner.decode_sample([s.slot for s in seqs], kv_len, full, steps)
        except Exception as err:
            self._isolate(seqs, err, lambda one: self._launch_decode(one, ids, steps))
            return
        for seq in seqs:
            seq.launched += steps
        ids.add(tokens)
        ids.groups.append((seqs, steps))

    def _launch_rounds(self, seqs: list[Sequence], ids: "_HostIds") -> list[Sequence]:
        """Launch one speculative round for the sequences that can take one (`SpeculativeRunner.eligible`) and
        return the rest, for plain steps. The round's (B, k + 2) output (count, tokens per row) joins the step's ids
        as a group of steps -(k + 2), which `_stream` hands to `_stream_rounds`."""
        spec: SpeculativeRunner = self.speculative
        go, plain = [], []
        for seq in seqs:
            (go if spec.eligible(seq) else plain).append(seq)
        if not go:
            return plain
        # The round writes target positions n .. n+k, n <= prompt_len + launched - 1 (launched: an upper bound)
        kv_len = max(s.prompt_len + s.launched for s in go) + spec.k
        full = not all(s.greedy_plain for s in go)
        try:
            out = spec.round([s.slot for s in go], kv_len, full)  # (B, k + 2)
        except Exception as err:
            self._isolate(go, err, lambda one: self._launch_rounds(one, ids))
            return plain
        for seq in go:
            seq.launched += spec.k + 1  # at most: `_stream_rounds` takes back what the round did not accept
        ids.add(out)
        ids.groups.append((go, -(spec.k + 2)))
        return plain

    def _stream_rounds(self, seqs: list[Sequence], host: torch.Tensor, start: int, width: int, now: float) -> int:
        """Stream a launched round's accepted tokens (row b: host[start + b * width] tokens after it), correct each
        row's `launched` (counted at k + 1) and the acceptance counts. Returns where the next group starts."""
        k, stats = width - 2, self.speculative.stats
        rows = host[start : start + len(seqs) * width].view(len(seqs), width).tolist()
        runs = []
        for seq, row in zip(seqs, rows):
            count = row[0]
            seq.launched -= k + 1 - count
            stats.proposed += k
            stats.accepted += count - 1
            runs.append(row[1 : 1 + count])
        self._stream_runs(seqs, runs, now)
        return start + len(seqs) * width

    def _isolate(self, seqs: list[Sequence], err: Exception, retry: Callable[[list[Sequence]], None]) -> None:
        """A failed step fails its requests, not the server: with several, `retry` each alone to find the bad one;
        a lone one ends with ERROR and the reason. Called from the step's `except` block."""
        if len(seqs) > 1:
            log.warning("engine step failed for %d sequences (%s); retrying each alone", len(seqs), err)
            for seq in seqs:
                retry([seq])
            return
        self._fail(seqs[0], err)

    def _fail(self, seq: Sequence, err: Exception, where: str = "") -> None:
        log.exception("request %s failed%s", seq.request_id, f" {where}" if where else "")
        self._finish(seq, FinishReason.ERROR, error=f"{type(err).__name__}: {err}")

    def _stream(self, step: "_Launched") -> None:
        """Hand a launched step's tokens to their sequences (waits for that step on the GPU)."""
        began = time.perf_counter()
        host = step.host()
        now = time.perf_counter()
        self.loop_clock.wait_s += now - began
        try:
            self._stream_groups(step, host, now)
        finally:
            self.loop_clock.stream_s += time.perf_counter() - now

    def _stream_groups(self, step: "_Launched", host: torch.Tensor, now: float) -> None:
        start = 0
        for seqs, steps in step.groups:
            if steps < 0:  # speculative rounds, `_launch_rounds`: each row's (count, k + 1 ids), steps = -(k + 2)
                start = self._stream_rounds(seqs, host, start, -steps, now)
                continue
            n = len(seqs) * steps
            if steps == 1:
                self._stream_ones(seqs, host[start : start + n].tolist(), now)
            else:  # step-major on the device: row i's tokens are i, i + B, i + 2B, ...
                self._stream_runs(seqs, host[start : start + n].view(steps, len(seqs)).t().tolist(), now)
            start += n

    def _stream_ones(self, seqs: list[Sequence], tokens: list[int], now: float) -> None:
        """One token per sequence. Hot: the loop body is `_append` written out, for a token that neither ends its
        sequence nor meets a stop string or a partial character (about 1 us per token saved from ~1.4 us on this
        repo's CPU, where 256 streams make a step host-bound)."""
        finished = SequenceStatus.FINISHED
        for seq, token in zip(seqs, tokens):
            if seq.status is finished:  # ended (stop string, cancel) while this token was in flight
                continue
            out = seq.output_ids
            table = seq.detokenizer.fast_table
            if len(out) + 1 < seq.length_limit and table is not None and 0 <= token < len(table):
                text = table[token]
                if text is not None:  # the common case, done here
                    out.append(token)
                    seq.token_times.append(now)
                    seq.detokenizer.pieces.append(text)
                    seq.sink.put((seq.request_id, (token,), text, None, None, None, ""))
                    continue
            try:
                self._append(seq, token, now)
            except Exception as err:  # e.g. the tokenizer refusing a token: fail this request only
                self._fail(seq, err, f"on token {token}")

    def _stream_runs(self, seqs: list[Sequence], runs: list[list[int]], now: float) -> None:
        """Several tokens per sequence (multi-step decode): a run of whole-character tokens that does not end its
        sequence goes out as one chunk; anything else token by token through `_append`."""
        finished = SequenceStatus.FINISHED
        for seq, run in zip(seqs, runs):
            if seq.status is finished:
                continue
            out = seq.output_ids
            table = seq.detokenizer.fast_table
            if len(out) + len(run) < seq.length_limit and table is not None and 0 <= min(run) and max(run) < len(table):
                texts = [table[t] for t in run]
                if None not in texts:
                    text = "".join(texts)
                    out.extend(run)
                    seq.token_times.extend([now] * len(run))
                    seq.detokenizer.pieces.append(text)
                    seq.sink.put((seq.request_id, tuple(run), text, None, None, None, ""))
                    continue
            for token in run:
                try:
                    self._append(seq, token, now)
                except Exception as err:
                    self._fail(seq, err, f"on token {token}")
                if seq.status is finished:
                    break

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        """Record one generated token, stream it, and end the sequence if it is done (once per token)."""
        out = seq.output_ids
        out.append(token)
        seq.token_times.append(now)
        detok = seq.detokenizer
        text = detok.add_one(token)
        if detok.stopped:
            self._finish(seq, FinishReason.STOP, token_ids=(token,), text=text)
        elif len(out) >= seq.length_limit:  # max_new_tokens, or the context is full: the next token would need a
            # cache position at max_len
            self._finish(seq, FinishReason.LENGTH, token_ids=(token,), text=text + detok.flush())
        else:  # a plain tuple of the Chunk's fields (the handle makes the Chunk): see _as_chunk
            seq.sink.put((seq.request_id, (token,), text, None, None, None, ""))

    def _finish(
        self, seq: Sequence, reason: FinishReason, *, token_ids: tuple[int, ...] = (), text: str = "", error: str = ""
    ) -> None:
        """Give the slot back, then send the final chunk."""
        slot = seq.slot
        self.scheduler.finish(seq)
        if slot is not None:
            self.runner.release(slot)
            if self.speculative is not None:
                self.speculative.draft.release(slot)
        end = time.perf_counter()
        with self._wake:
            self._sinks.pop(seq.request_id, None)
            self._finished[reason.value] += 1
        final = Chunk(
            seq.request_id,
            token_ids,
            text,
            finish_reason=reason,
            usage=Usage(seq.prompt_len, len(seq.output_ids)),
            timings=_timings(seq, end),
            error=error,
        )
        for listener in self.finish_listeners:
            try:
                listener(final)
            except Exception:  # a metrics bug must not keep a caller from its final chunk
                log.exception("finish listener failed")
        seq.sink.put(final)


def prepared(requests: list[Request], max_len: int) -> list[Request]:
    """`requests` ready to queue: a fresh request_id where it is empty; ValueError for a prompt beyond `max_len`."""
    out = []
    for request in requests:
        if not request.request_id:
            request = replace(request, request_id=uuid.uuid4().hex)
        if len(request.prompt_ids) > max_len:
            raise ValueError(f"prompt: {len(request.prompt_ids)} tokens exceed the context length {max_len}")
        out.append(request)
    return out


def _timings(seq: Sequence, end: float) -> Timings:
    ms = lambda t: (t - seq.arrived_at) * 1e3  # noqa: E731
    times = seq.token_times
    return Timings(
        ttft_ms=ms(times[0]) if times else 0.0,
        mean_inter_token_ms=(times[-1] - times[0]) * 1e3 / (len(times) - 1) if len(times) > 1 else 0.0,
        total_ms=ms(end),
        queue_ms=ms(seq.admitted_at if seq.admitted_at is not None else end),
        token_ms=tuple([(t - seq.arrived_at) * 1e3 for t in times]),  # a comprehension: no call per token
    )


_new_tuple = tuple.__new__


def _as_chunk(item: tuple) -> Chunk:
    """A sink's item as a Chunk. The engine puts a token's chunk as a plain tuple of the Chunk's fields: Python's
    collector untracks an exact tuple of strings, numbers and such tuples in its young collections (before it could
    age into the oldest generation), but never a tuple subclass. With 256 streams' NamedTuples waiting in their queues, every one stayed tracked and aged into the
    oldest generation, and full collections (~0.3 s each over a server's heap of ~400k objects) stalled the loop."""
    return item if type(item) is Chunk else _new_tuple(Chunk, item)


def _mark_admitted(seqs: list[Sequence]) -> None:
    """The time a sequence first runs (its queue time ends); a long prompt's later chunks keep the first."""
    now = time.perf_counter()
    for seq in seqs:
        if seq.admitted_at is None:
            seq.admitted_at = now


class _Launched(NamedTuple):
    """One launched engine step: groups of (sequences in row order, tokens each), whose new ids arrive in `buf` one
    group after another (a group of several steps step-major), and the event after their copies."""

    groups: list[tuple[list[Sequence], int]]
    buf: torch.Tensor  # pinned (n,) long, written by asynchronous copies
    done: Any  # a torch.cuda.Event (or a runner's mark) recorded after the copies (None on CPU: the copies are done)

    def host(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.buf


class _HostIds:
    """The ids of the engine step being launched: each launch's ids copied at once into the next pinned buffer
    (a decode launch's ids are a view that the next launch rewrites: stream order makes the copy safe)."""

    def __init__(self, buf: torch.Tensor, cuda: bool, mark: "Callable[[], Any] | None") -> None:
        self.buf, self.cuda, self.mark, self.n = buf, cuda, mark, 0
        self.groups: list[tuple[list[Sequence], int]] = []

    def add(self, ids: torch.Tensor) -> None:
        """Copy a launch's ids, (B,) or (steps, B), after the ids already here."""
        m = ids.numel()
        self.buf[self.n : self.n + m].view(ids.shape).copy_(ids, non_blocking=self.cuda)
        self.n += m

    def close(self) -> _Launched:
        return _Launched(self.groups, self.buf[: self.n], self.mark() if self.mark is not None else None)

    def cut(self) -> _Launched:
        """The ids added so far as a launched step of their own (its own event); later launches' ids go after them."""
        launched = self.close()
        self.buf, self.n, self.groups = self.buf[self.n :], 0, []
        return launched


def _cuda_event() -> "torch.cuda.Event":
    done = torch.cuda.Event()
    done.record()
    return done


class _OutputRing:
    """Pinned host buffers for the new ids of the steps in flight (two are ever in use: the step being streamed
    and the one running), each filled by asynchronous copies after its launches and read once its event has
    passed (`mark`: what records that event; default a CUDA event on CUDA, none elsewhere)."""

    def __init__(self, device: torch.device, size: int, mark: "Callable[[], Any] | None" = None, n: int = 3) -> None:
        self.cuda = device.type == "cuda"
        self.mark = mark if mark is not None else _cuda_event if self.cuda else None
        self._bufs = [torch.empty(size, dtype=torch.long, pin_memory=self.cuda) for _ in range(n)]
        self._i = 0

    def open(self) -> _HostIds:
        buf = self._bufs[self._i]
        self._i = (self._i + 1) % len(self._bufs)
        return _HostIds(buf, self.cuda, self.mark)

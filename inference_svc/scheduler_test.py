"""Continuous-batching admission: FIFO into free slots every step, prefill split from decode, bounded queue."""

from __future__ import annotations

import queue

import pytest

from inference_svc.detokenizer import StreamingDetokenizer
from inference_svc.kv_pool import KVPool
from inference_svc.params import Request
from inference_svc.scheduler import QueueFull, Scheduler
from inference_svc.sequence import Sequence, SequenceStatus
from model.sampling import SamplingParams
from model.tokenizers import ByteTokenizer


def _seq(rid: str, prompt_len: int = 4) -> Sequence:
    request = Request(prompt_ids=tuple(range(prompt_len)), params=SamplingParams(max_new_tokens=4), request_id=rid)
    return Sequence(
        request=request, detokenizer=StreamingDetokenizer(ByteTokenizer()), generator=None, sink=queue.Queue()
    )


def test_admits_fifo_into_free_slots_and_splits_prefill_from_decode():
    sched = Scheduler(KVPool(2), max_queue=10)
    a, b, c = _seq("a"), _seq("b"), _seq("c")
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert out.prefill == [a, b] and out.decode == [] and (a.slot, b.slot) == (0, 1)
    assert c.status is SequenceStatus.WAITING and sched.n_waiting == 1
    out = sched.schedule()
    assert out.prefill == [] and out.decode == [a, b]
    sched.finish(a)  # a finished: c joins on the very next step, while b keeps decoding
    out = sched.schedule()
    assert out.prefill == [c] and out.decode == [b] and c.slot == 0
    assert a.status is SequenceStatus.FINISHED and sched.pool.n_free == 0


def test_prefill_token_budget_still_admits_one():
    sched = Scheduler(KVPool(4), max_queue=10, max_prefill_tokens=10)
    seqs = [_seq("a", 12), _seq("b", 3), _seq("c", 6), _seq("d", 2)]
    for s in seqs:
        sched.add(s)
    assert sched.schedule().prefill == seqs[:1]  # over the budget alone: admitted anyway
    assert sched.schedule().prefill == seqs[1:3]  # 3 + 6 tokens; d's 2 would pass 10
    out = sched.schedule()
    assert out.prefill == seqs[3:] and out.decode == seqs[:3]


def test_abort_frees_waiting_and_running_on_the_next_schedule():
    sched = Scheduler(KVPool(1), max_queue=10)
    a, b = _seq("a"), _seq("b")
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.abort("a") and sched.abort("b") and not sched.abort("zzz")
    out = sched.schedule()
    assert out.aborted == [b, a]  # waiting ones are swept first
    assert out.prefill == [] and out.decode == []
    assert sched.pool.n_free == 1 and not sched.has_work()
    assert not sched.abort("a")


def test_bounded_queue_duplicate_ids_and_drain():
    sched = Scheduler(KVPool(1), max_queue=2)
    sched.add(_seq("a"))  # takes the free slot at the next step: not counted as waiting
    sched.add(_seq("b"))
    sched.add(_seq("c"))
    with pytest.raises(QueueFull, match="2 requests"):
        sched.add(_seq("d"))
    with pytest.raises(ValueError, match="already in flight"):
        sched.add(_seq("a"))
    sched.schedule()  # a runs, b and c wait: still full
    with pytest.raises(QueueFull):
        sched.add(_seq("d"))
    sched.finish(sched.schedule().decode[0])  # a done: b takes its slot next step, so d fits
    sched.add(_seq("d"))
    drained = sched.drain()
    assert sorted(s.request_id for s in drained) == ["b", "c", "d"]
    assert all(s.status is SequenceStatus.FINISHED for s in drained)
    assert sched.pool.n_free == 1 and sched.n_running == sched.n_waiting == 0


def test_a_request_that_can_take_a_free_slot_is_never_refused():
    """Issue 22 finding 5: max_queue counts waiting requests only; max_queue 0 refused everything."""
    sched = Scheduler(KVPool(2), max_queue=0)
    sched.add(_seq("a"))
    sched.add(_seq("b"))
    with pytest.raises(QueueFull):
        sched.add(_seq("c"))
    assert sched.schedule().prefill == [sched._by_id["a"], sched._by_id["b"]]
    sched = Scheduler(KVPool(2), max_queue=2)
    for rid in "abcd":  # two slots + two waiting, all at once
        sched.add(_seq(rid))
    with pytest.raises(QueueFull):
        sched.add(_seq("e"))


@pytest.mark.parametrize(
    "kw, words", [({"max_queue": -1}, "max_queue"), ({"max_prefill_tokens": 0}, "max_prefill_tokens")]
)
def test_bad_limits(kw, words):
    with pytest.raises(ValueError, match=words):
        Scheduler(KVPool(1), **{"max_queue": 1, **kw})

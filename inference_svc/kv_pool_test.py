"""The slot pool hands each slot to one holder at a time and accounts for every one."""

from __future__ import annotations

import random

import pytest

from inference_svc.kv_pool import KVPool, PoolError


def test_allocates_lowest_first_until_empty():
    pool = KVPool(3)
    assert [pool.allocate() for _ in range(4)] == [0, 1, 2, None]
    assert pool.n_free == 0 and pool.n_used == 3


def test_double_free_and_foreign_slot_raise():
    pool = KVPool(2)
    slot = pool.allocate()
    pool.free(slot)
    with pytest.raises(PoolError, match="slot 0 is not in use"):
        pool.free(slot)
    with pytest.raises(PoolError, match="slot 7"):
        pool.free(7)


@pytest.mark.parametrize("n", [0, -1, 1.5, True])
def test_bad_size(n):
    with pytest.raises(ValueError, match="n_slots must be an integer >= 1"):
        KVPool(n)


def test_random_churn_never_hands_out_a_slot_twice_and_leaks_nothing():
    rng = random.Random(0)
    pool = KVPool(8)
    held: set[int] = set()
    for _ in range(2000):
        if held and (rng.random() < 0.5 or pool.n_free == 0):
            slot = rng.choice(sorted(held))
            held.remove(slot)
            pool.free(slot)
        else:
            slot = pool.allocate()
            assert slot is not None and slot not in held and 0 <= slot < 8
            held.add(slot)
        assert pool.n_used == len(held) and pool.n_free == 8 - len(held)
    for slot in list(held):
        pool.free(slot)
    assert [pool.allocate() for _ in range(8)] == list(range(8))

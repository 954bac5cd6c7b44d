"""The KV-cache slot pool: hands out and takes back the slots of a preallocated `model.kv_cache.KVCache`.

The cache itself is allocated once by the model runner (one slot = one sequence's keys and values for
every layer); the pool only accounts for which slots are in use, so that admission is O(1), a slot is
never handed out twice, and a leak (a slot never given back) shows up in `n_free`.
"""

from __future__ import annotations

from model.field_checks import check_int

__all__ = ["KVPool", "PoolError"]


class PoolError(RuntimeError):
    """A slot was freed twice, or a slot outside the pool was named: a bookkeeping bug, never user input."""


class KVPool:
    """Slots 0..n_slots-1 of a KV cache. Lowest free slot first, so a lightly loaded server keeps its
    working set in the first slots of the cache."""

    def __init__(self, n_slots: int) -> None:
        check_int("n_slots", n_slots, 1)
        self.n_slots = n_slots
        self._free = list(range(n_slots - 1, -1, -1))  # a stack: pop() gives the lowest slot
        self._used: set[int] = set()

    @property
    def n_free(self) -> int:
        """Slots available now."""
        return len(self._free)

    @property
    def n_used(self) -> int:
        """Slots held by running sequences."""
        return len(self._used)

    def allocate(self) -> int | None:
        """A free slot, or None when every slot is in use."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back; freeing a slot that is not in use raises PoolError."""
        if slot not in self._used:
            raise PoolError(f"slot {slot} is not in use (pool of {self.n_slots}); double free?")
        self._used.remove(slot)
        self._free.append(slot)
        if len(self._free) == self.n_slots:
            self._free.sort(reverse=True)  # back to lowest-first once idle

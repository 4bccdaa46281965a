"""Maps with a size budget for what callers can make a server remember: an LRU bounded by bytes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from cachetools import LRUCache

K = TypeVar("K")
V = TypeVar("V")

#: What one entry costs beyond its value's own bytes: its key and the bookkeeping around it. Counted
#: so that a flood of empty values is bounded too.
ENTRY_OVERHEAD = 256


class ByteBudgetLRU(LRUCache[K, V]):
    """An LRU map holding at most ``max_bytes`` of values, as ``size_of`` counts them (plus
    :data:`ENTRY_OVERHEAD` each); the least recently used go first. A value larger than the whole
    budget is not kept (and drops the entry it would replace), so storing never fails.

    Args:
        max_bytes: The budget.
        size_of: Returns the bytes one value holds (its wire size, say).
    """

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        super().__init__(max_bytes, getsizeof=lambda value: size_of(value) + ENTRY_OVERHEAD)

    def __setitem__(self, key: K, value: V) -> None:
        if self.getsizeof(value) > self.maxsize:
            self.pop(key, None)
            return
        super().__setitem__(key, value)

"""A bounded least-recently-used cache, safe from several threads: what the format readers
(decompressed grains and blocks) and the read cache filter (remote blocks) keep.

Why here: formats and filters are sibling layers and may not import each other; this module
sits below both. It must not know what it holds.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """Least-recently-used values, at most ``capacity`` of them; safe from several threads.

    Two threads that miss the same key may both compute it; the values are equal, so the
    second simply replaces the first (cheaper than holding the lock while decompressing).
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return value

    def discard(self, key: K) -> None:
        """Forget ``key`` (its value is stale); nothing if it is not held."""
        with self._lock:
            self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)

"""The store's in-process caches: immutable model versions, and the latest-pointer protocol."""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from detector.store.codec import ModelVersion


class PointerCache(Protocol):
    """A process-local cache of latest pointers that Redis invalidates (the API has one)."""

    generation: int

    def get(self, series_id: str) -> int | None: ...

    def put(self, series_id: str, version: int, generation: int) -> None: ...


class VersionCache:
    """A small bounded mapping for immutable model versions (they never change once made)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[tuple[str, int], ModelVersion] = OrderedDict()

    def get(self, key: tuple[str, int]) -> ModelVersion | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: tuple[str, int], value: ModelVersion) -> None:
        if self.capacity <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)

"""A cache of parsed product catalogues, with a bug on its error path.

``load(key, text)`` parses a catalogue (a JSON list of items) once and keeps
the result, so later calls with the same key are free; ``evict(key)`` drops it.

The bug: the record goes into the cache *before* it is complete. If parsing
fails half-way, with a ``MemoryError`` for example, the exception leaves
``load`` but the half-built record stays in the cache: its memory is never
released, and the next ``load`` of that key returns a record without an
index. Nothing in an ordinary test run shows it, because parsing never fails
there. ``catalog_fixed.py`` is the same module with the bug fixed.
"""

from __future__ import annotations

import json

_cache: dict[str, Record] = {}


class Record:
    """One parsed catalogue: its source text and an index by SKU."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.source: bytes | None = None
        self.index: dict[str, dict] | None = None


def load(key: str, text: str) -> Record:
    """The record for ``key``, parsed from ``text`` on first use."""
    record = _cache.get(key)
    if record is not None:
        return record
    # BUG: cached before it is complete; any failure below leaves it there.
    record = _cache[key] = Record(key)
    record.source = text.encode()
    items = json.loads(text)
    record.index = {item["sku"]: item for item in items}
    return record


def evict(key: str) -> None:
    """Forget the record for ``key`` (nothing happens if there is none)."""
    _cache.pop(key, None)

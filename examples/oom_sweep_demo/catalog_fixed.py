"""``catalog.py`` with its error-path bug fixed: a record enters the cache only
once it is complete, so a failure while parsing leaves nothing behind."""

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
    record = Record(key)
    record.source = text.encode()
    items = json.loads(text)
    record.index = {item["sku"]: item for item in items}
    # Last, and only when everything above succeeded.
    _cache[key] = record
    return record


def evict(key: str) -> None:
    """Forget the record for ``key`` (nothing happens if there is none)."""
    _cache.pop(key, None)

"""What the test servers do for a request: ordinary work and memory bombs,
written once and served by every framework's app.

Each function takes the request's query as a mapping of str to str (and the
body, where it reads one) and returns a JSON-ready dict.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import zlib

import numpy
from PIL import Image

# The decompression bomb must reach the allocator: Pillow's own pixel limit
# would refuse it first, and protecting code that has no such guard is the
# point of the runtime.
Image.MAX_IMAGE_PIXELS = None


def hello(query) -> dict:
    return {"hello": query.get("name", "world")}


def repeat(query) -> dict:
    """``b"x" * n``: ordinary for small n, a bomb for a huge one."""
    data = b"x" * int(query["n"])
    return {"length": len(data), "crc": zlib.crc32(data)}


def array(query) -> dict:
    """A NumPy array of the shape the client chose."""
    a = numpy.ones((int(query["rows"]), int(query["cols"])), dtype=numpy.float64)
    return {"sum": float(a.sum())}


def image(body: bytes) -> dict:
    """Decode an uploaded PNG; a tiny file may declare a huge image."""
    with Image.open(io.BytesIO(body)) as im:
        im.load()
        return {"size": list(im.size), "mode": im.mode, "extrema": list(im.getextrema())}


def echo(body: bytes) -> dict:
    return {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def grow_step(rows: list) -> None:
    """One step of a handler that grows without bound (10 MiB a step)."""
    rows.append(bytearray(10 << 20))


def grow(query) -> dict:
    rows: list = []
    while True:
        grow_step(rows)


def stream(query):
    """A streamed body whose second chunk is a bomb: the first is sent by then."""
    yield b"first chunk\n" * 100
    yield b"x" * (10**10)


def stream_handled(query):
    """A streamed body that is refused its second chunk, catches the refusal
    and ends with a short one instead: a complete response."""
    yield b"first chunk\n" * 100
    try:
        chunk = b"x" * (10**10)
    except MemoryError:
        chunk = b"the rest did not fit\n"
    yield chunk


def stats(query) -> dict:
    import allocpolicy

    # ?hold=SECONDS keeps the worker busy, so that requests sent at once
    # reach different workers of a pre-fork server.
    time.sleep(float(query.get("hold", 0)))
    s = allocpolicy.stats()
    scope = s.scopes.get(query.get("scope", "request"))
    return {
        "pid": os.getpid(),
        "live": scope.live if scope else None,
        "violations": scope.violations if scope else None,
        "process_budget": s.process.budget if s.process else None,
    }


def png(width: int, height: int) -> bytes:
    """A PNG of one colour: a few hundred bytes even for a huge image."""
    buf = io.BytesIO()
    Image.new("L", (width, height), 7).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# Warm up what each kind of request loads on first use (Pillow's plugins,
# NumPy's reductions): loaded inside a request, it would be charged to that
# request's scope for good and move the baseline the tests compare with.
image(png(8, 8))
array({"rows": "2", "cols": "2"})


async def grow_across_awaits(query) -> dict:
    """A handler that grows across awaits: other requests run between its steps."""
    import asyncio

    rows: list = []
    while True:
        grow_step(rows)
        await asyncio.sleep(0)

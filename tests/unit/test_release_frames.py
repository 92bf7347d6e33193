"""Clearing a kept refusal's frames frees the failed work's locals and never
finalizes a coroutine that caught the error and is still suspended (Django
under ASGI keeps such a coroutine in the traceback while it awaits its error
handling)."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref

from allocpolicy._core.refusal import release_frames


class Payload:
    pass


def test_a_suspended_coroutine_in_the_traceback_goes_on():
    async def main():
        caught = {}
        resumed = asyncio.Event()

        async def handler():
            try:
                raise MemoryError
            except MemoryError as exc:
                caught["exc"] = exc
                # GIVEN a coroutine suspended after catching the error
                await resumed.wait()
                return "went on"

        task = asyncio.ensure_future(handler())
        await asyncio.sleep(0)
        # WHEN the error's frames are released while it is suspended
        release_frames(caught["exc"].__traceback__)
        resumed.set()
        for _ in range(10):  # a few turns of the loop, never a wait without end
            await asyncio.sleep(0)
        # THEN it resumed and finished (it was not finalized)
        assert task.done()
        return task.result()

    assert asyncio.run(main()) == "went on"


def test_the_finished_frames_locals_are_freed():
    held: list[weakref.ref] = []

    def work():
        payload = Payload()  # held by this frame only
        held.append(weakref.ref(payload))
        raise MemoryError

    async def coro_work():
        payload = Payload()
        held.append(weakref.ref(payload))
        raise MemoryError

    for run in (work, lambda: asyncio.run(coro_work())):
        held.clear()
        gc.disable()  # the payload goes by the clearing, not by the collector
        try:
            try:
                run()
            except MemoryError as exc:
                err = exc
            # GIVEN a kept error whose traceback holds the failed frame
            assert held[0]() is not None
            # WHEN its frames are released
            release_frames(err.__traceback__)
            # THEN the payload is gone at once
            assert held[0]() is None, sys.version
        finally:
            gc.enable()

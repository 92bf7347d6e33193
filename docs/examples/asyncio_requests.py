"""Each asyncio task is charged its own allocations, across its awaits.

    allocpolicy run --policy docs/examples/quickstart_policy.toml -- python docs/examples/asyncio_requests.py
"""

import asyncio

import allocpolicy


async def handle(name: str, size_mib: int, steps: int) -> str:
    """A request that builds its response in pieces, awaiting between them."""
    pieces = []
    try:
        with allocpolicy.task("request"):
            for _ in range(steps):
                pieces.append(bytearray(size_mib << 20))
                await asyncio.sleep(0)  # the other requests run here
            # Work handed to a thread is charged to this request too.
            digest = await asyncio.to_thread(lambda: bytes(8 << 20))
            return f"{name}: {sum(map(len, pieces)) >> 20} MiB built, {len(digest) >> 20} MiB in a thread"
    except allocpolicy.AllocError as err:
        return f"{name}: refused after {err.live >> 20} MiB of its own ({err.budget >> 20} MiB budget)"


async def main() -> None:
    # Three ordinary requests of 40 MiB and one that never stops growing, all
    # interleaved on one thread: 120 MiB and more are live at once, but each
    # request is held to its own 64 MiB.
    results = await asyncio.gather(
        handle("a", 10, 4),
        handle("bomb", 10, 100),
        handle("b", 10, 4),
        handle("c", 10, 4),
    )
    print("\n".join(results))


asyncio.run(main())

"""Work handed to other threads is charged to the task only when bound to it.

    allocpolicy run --policy docs/examples/quickstart_policy.toml -- python docs/examples/bind_threads.py
"""

from concurrent.futures import ThreadPoolExecutor

import allocpolicy


def make_buffer(size_mib: int) -> bytearray:
    return bytearray(size_mib << 20)


with ThreadPoolExecutor(max_workers=2) as pool:
    # Unbound: the worker thread has its own scope stack, which is empty, so
    # its allocations belong to the process scope, not to this request.
    with allocpolicy.task("request"):
        a = pool.submit(make_buffer, 40).result()
        b = pool.submit(make_buffer, 40).result()
        print(f"unbound: {(len(a) + len(b)) >> 20} MiB allocated, none of it charged to the request")
    del a, b

    # Bound: the wrapper enters this request's instance in the worker thread,
    # so both buffers count against the same 64 MiB budget.
    try:
        with allocpolicy.task("request"):
            work = allocpolicy.bind(make_buffer)
            first = pool.submit(work, 40).result()
            second = pool.submit(work, 40).result()
    except allocpolicy.AllocError as err:
        print(
            f"bound: the second buffer was refused ({err.live >> 20} MiB live of "
            f"{err.budget >> 20} MiB in scope {err.scope!r})"
        )

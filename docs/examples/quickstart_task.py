"""Handle three requests; the one that asks for too much memory fails alone.

Run it under the runtime:

    allocpolicy run --policy docs/examples/quickstart_policy.toml -- python docs/examples/quickstart_task.py
"""

import allocpolicy


def handle(size_mib: int) -> str:
    buffer = bytearray(size_mib << 20)  # stands in for real work
    return f"processed {len(buffer) >> 20} MiB"


def serve(size_mib: int) -> None:
    try:
        with allocpolicy.task("request"):
            print("ok:", handle(size_mib))
    except allocpolicy.AllocError as err:
        print(
            f"request dropped: {err.size} bytes refused in scope {err.scope!r} "
            f"(reason {err.reason!r}, budget {err.budget} bytes)"
        )


if not allocpolicy.is_active():
    raise SystemExit("start me with: allocpolicy run --policy ... -- python quickstart_task.py")

for size in (8, 500, 16):
    serve(size)
print("the process is still here")

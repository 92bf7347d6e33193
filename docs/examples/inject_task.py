"""Fault injection: fail a chosen allocation of a task, then replay it.

    allocpolicy run --policy docs/examples/inject_policy.toml -- python docs/examples/inject_task.py
"""

import allocpolicy


def parse_rows(n):
    # One malloc per row: 2 KiB is beyond pymalloc's small objects.
    return [bytearray(2048) for _ in range(n)]


def ingest(label):
    try:
        with allocpolicy.task("ingest"):
            rows = parse_rows(100)
    except allocpolicy.AllocError as err:
        print(f"{label}: {err.reason}: {err}")
        print(f"  replay with: {allocpolicy.replay_setting(err)}")
    else:
        print(f"{label}: {len(rows)} rows")


# 1. The policy's [inject] table is in force from the start.
ingest("first task")
ingest("second task")  # the numbering goes on: #25 is behind us

# 2. A setting for one block; the one in force before comes back after it.
with allocpolicy.inject(scope="ingest", nth=60):
    ingest("nth=60")

# 3. A seeded probability: the same seed fails the same allocations.
for attempt in (1, 2):
    with allocpolicy.inject(scope="ingest", probability=0.01, seed=7) as injection:
        for task in range(4):
            ingest(f"seed 7, attempt {attempt}, task {task}")
        stats = injection.stats()
    print(f"  {stats.injected} failures, first #{stats.first_index}, last #{stats.last_index}")

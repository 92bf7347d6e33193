"""A fallible scope does not refuse ordinary allocations, even past its budget.

    allocpolicy run --policy docs/examples/fallible_policy.toml -- python docs/examples/fallible_mode.py
"""

import allocpolicy

with allocpolicy.task("load"):
    weights = bytearray(48 << 20)  # three times the budget
    print(f"allocated {len(weights) >> 20} MiB in a scope with a 16 MiB budget")
    try:
        bytearray(1 << 50)  # no allocator can serve 1 PiB: a failure, not a budget matter
    except MemoryError:
        print("bytearray(1 << 50) raised MemoryError; the task goes on")

load = allocpolicy.stats().scopes["load"]
print(f"refused: {load.violations}, largest instance peak: {load.max_instance_peak >> 20} MiB")

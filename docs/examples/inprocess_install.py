"""In-process mode: task budgets in a running interpreter, no relaunch.

Run it with a plain ``python docs/examples/inprocess_install.py``: no
``allocpolicy run``, no LD_PRELOAD.
"""
import allocpolicy

allocpolicy.install({"scopes": {"job": {"on_oom": "raise", "budget": "64 MiB"}}})


def job(rows):
    with allocpolicy.task("job"):
        table = [{"id": i, "name": f"row {i}"} for i in range(rows)]
        return len(table)


for rows in (10_000, 5_000_000, 20_000):
    try:
        print(f"job({rows:,}): {job(rows):,} rows")
    except allocpolicy.AllocError as err:
        print(f"job({rows:,}) dropped: over the {err.budget >> 20} MiB budget of {err.scope!r}")

counters = allocpolicy.stats().scopes["job"]
print(f"instances: {counters.instances}, refused: {counters.violations}")
allocpolicy.uninstall()
print("installed:", allocpolicy.is_installed())

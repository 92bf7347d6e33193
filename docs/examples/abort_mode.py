"""In an abort-mode scope, a refused allocation ends the process with a diagnostic.

    allocpolicy run --policy docs/examples/abort_policy.toml -- python docs/examples/abort_mode.py
"""

import allocpolicy


def load_rows() -> list[bytes]:
    rows = []
    for _ in range(64):
        rows.append(bytes(1 << 20))  # 1 MiB per row, 64 rows: over the 32 MiB budget
    return rows


print("loading", flush=True)
with allocpolicy.scope("ingest"):
    load_rows()
print("not reached")

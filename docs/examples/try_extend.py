"""try_extend under a budget that runs out part way: nothing is lost.

    allocpolicy run --policy docs/examples/fallible_code_policy.toml -- python docs/examples/try_extend.py
"""

import allocpolicy

MiB = 1 << 20


def rows(n: int):
    for i in range(n):
        yield bytes([i]) * (2 * MiB)  # 2 MiB each


with allocpolicy.scope("collect"):  # fallible, 16 MiB budget
    collected = []
    unstored = allocpolicy.try_extend(collected, rows(40))
    if unstored:
        rest = list(unstored.rest)  # the generator, positioned after unstored.item
        print(f"stored {len(collected)} rows; row {unstored.item[0]} was taken but not stored; "
              f"{len(rest)} rows not taken")
        print(f"refused: reason {unstored.error.reason!r}, limit {unstored.error.limit!r}")
        print("stored + [item] + rest == input:", collected + [unstored.item] + rest == list(rows(40)))

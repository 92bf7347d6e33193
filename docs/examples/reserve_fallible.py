"""Reservations in a fallible scope: refuse before the work starts, not half way.

    allocpolicy run --policy docs/examples/fallible_code_policy.toml -- python docs/examples/reserve_fallible.py
"""

import allocpolicy

MiB = 1 << 20

with allocpolicy.scope("build"):
    # More than the 100 MiB budget: the refusal is returned, not raised, and
    # nothing was allocated.
    refusal = allocpolicy.try_reserve(200 * MiB)
    print(f"try_reserve(200 MiB): {type(refusal).__name__}, reason {refusal.reason!r}, "
          f"limit {refusal.limit!r}")

    try:
        with allocpolicy.reserve(50 * MiB) as reservation:
            index = bytearray(40 * MiB)  # draws on the reservation: never refused
            left = reservation.left
            extra = bytearray(80 * MiB)  # beyond it: an overdraft, refused here
    except allocpolicy.AllocError as err:
        print(f"reserve(50 MiB): granted; 40 MiB inside fit, {left / MiB:.1f} MiB of it left")
        print(f"80 MiB inside: refused, limit {err.limit!r}, "
              f"reservation {err.budget // MiB} MiB, {err.size} bytes asked")
    del index

    # The same work with overdraft="count": the overdraft is allowed and counted.
    with allocpolicy.reserve(50 * MiB, overdraft="count") as reservation:
        index = bytearray(40 * MiB)
        extra = bytearray(80 * MiB)
    print(f"with overdraft='count': {reservation.overdrafts} overdraft, "
          f"{reservation.overdraft_bytes} bytes beyond the reservation")
    del index, extra

build = allocpolicy.stats().scopes["build"]
print(f"reservations {build.reservations}, refused {build.refused_reservations}")
print(f"overdrafts {build.overdrafts}, {build.overdraft_bytes} bytes; refused allocations {build.violations}")

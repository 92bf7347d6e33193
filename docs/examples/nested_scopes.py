"""Nested scopes: the innermost scope decides the mode, every enclosing budget applies.

    allocpolicy run --policy docs/examples/nested_policy.toml -- python docs/examples/nested_scopes.py
"""

import allocpolicy


def attempt(label: str, inner: str, size_mib: int) -> None:
    try:
        with allocpolicy.task("request"):
            with allocpolicy.scope(inner):
                bytearray(size_mib << 20)
        print(f"{label}: granted")
    except allocpolicy.AllocError as err:
        print(
            f"{label}: refused by the {err.limit} of scope {err.scope!r} "
            f"({err.budget >> 20} MiB), caught at task {err.task!r}"
        )


# 32 MiB fits the request (64 MiB) but not the thumbnail scope (16 MiB).
attempt("thumbnail, 32 MiB", "thumbnail", 32)
# parse has no budget, but the enclosing request's 64 MiB still applies.
attempt("parse, 100 MiB", "parse", 100)
# Within every budget on the chain.
attempt("parse, 8 MiB", "parse", 8)

"""A service started with a bare LD_PRELOAD: a container's entry point or a
systemd unit, no `allocpolicy run` on its command line.

The environment names the runtime library (LD_PRELOAD) and the policy
(ALLOCPOLICY_POLICY); see docs/deployment.rst for the Dockerfile and the unit.
"""

import gzip
import os

import allocpolicy


def handle(size_mib: int) -> str:
    buffer = bytearray(size_mib << 20)  # stands in for real work
    return f"processed {len(buffer) >> 20} MiB"


def serve(size_mib: int) -> None:
    try:
        with allocpolicy.task("request"):
            print("ok:", handle(size_mib))
    except allocpolicy.AllocError as err:
        print(f"request dropped: {err.size} bytes refused in scope {err.scope!r}")


if not allocpolicy.is_active():
    raise SystemExit("LD_PRELOAD does not name the allocpolicy runtime (see `allocpolicy lib`)")

policy = allocpolicy.active_policy()
print("policy:", os.path.basename(policy.source), "scopes:", ", ".join(policy.scopes))
for size in (8, 500, 16):
    serve(size)
bomb = gzip.compress(bytes(64 << 20))  # 64 MiB of zeros, a few KiB compressed
try:
    gzip.decompress(bomb)
except allocpolicy.AllocError as err:
    print(f"upload refused: scope {err.scope!r}, budget {err.budget >> 20} MiB")
print("the service is still here")

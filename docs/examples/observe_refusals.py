"""Count and log refusals, then read the counters as JSON and as Prometheus text.

Run it under the runtime:

    allocpolicy run --policy docs/examples/quickstart_policy.toml -- python docs/examples/observe_refusals.py
"""

import json
import logging
import sys

import allocpolicy
from allocpolicy.metrics import prometheus_text

logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
log = logging.getLogger("service")
refused_by_reason: dict[str, int] = {}


@allocpolicy.on_refusal
def record(err: allocpolicy.AllocError) -> None:
    # Called once per refusal, at the task boundary, before AllocError propagates.
    refused_by_reason[err.reason] = refused_by_reason.get(err.reason, 0) + 1
    log.warning("refused %d bytes in %s: %s over budget %d", err.size, err.scope, err.reason, err.budget)


def serve(size_mib: int) -> None:
    try:
        with allocpolicy.task("request"):
            bytearray(size_mib << 20)  # stands in for real work
    except allocpolicy.AllocError:
        pass  # the hook has logged it; the process goes on


if not allocpolicy.is_active():
    raise SystemExit("start me with: allocpolicy run --policy ... -- python observe_refusals.py")

for size in (8, 500, 16, 100):
    serve(size)
print("hook counted:", refused_by_reason)

request = allocpolicy.stats().as_dict()["scopes"]["request"]
print(json.dumps({key: request[key] for key in ("instances", "violations", "refusals", "budget")}))

for line in prometheus_text().splitlines():
    if line.startswith("allocpolicy_scope_refusals_total{scope=\"request\""):
        print(line)

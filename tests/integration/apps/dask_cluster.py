"""Run under ``allocpolicy run --policy task_policy.toml``: a LocalCluster of
two worker processes with the plugin, ordinary tasks with bombs among them;
prints one JSON line."""

from __future__ import annotations

import json
import os
import sys

from distributed import Client, LocalCluster

import allocpolicy
import jobs
from allocpolicy.integrations.dask import AllocPolicyPlugin

N = 80
EVERY = 8
MEMORY_LIMIT = 1 << 30


def main(retries: int) -> None:
    with LocalCluster(
        n_workers=2, threads_per_worker=2, processes=True, memory_limit=MEMORY_LIMIT,
        dashboard_address=None, host="127.0.0.1",
    ) as cluster, Client(cluster) as client:
        client.register_plugin(AllocPolicyPlugin(scope="task", retries=retries))
        before = client.run(os.getpid)  # worker address -> pid
        kinds, futures = [], []
        for i in range(N):
            kinds.append("normal")
            futures.append(client.submit(jobs.normal, i, pure=False))
            if retries and i % EVERY == 0:
                kinds.append("needs_mib")
                futures.append(client.submit(jobs.needs_mib, 100, pure=False))
            if i % EVERY == EVERY - 1:
                bomb = jobs.BOMBS[(i // EVERY) % len(jobs.BOMBS)]
                kinds.append(bomb.__name__)
                futures.append(client.submit(bomb, i, pure=False))
        results = []
        for kind, f in zip(kinds, futures):
            try:
                value = f.result(timeout=120)
                results.append({"kind": kind, "ok": True, "value": value if kind == "needs_mib" else None})
            except allocpolicy.AllocError as err:
                results.append({"kind": kind, "error": "AllocError", "scope": err.scope, "size": err.size,
                                "budget": err.budget, "reason": err.reason})
            except Exception as err:  # reported, never hidden
                results.append({"kind": kind, "error": type(err).__name__, "detail": str(err)[:200]})
        del futures
        after = client.run(os.getpid)
        lives = client.run(jobs.scope_live)
        budgets = client.run(lambda: allocpolicy.stats().process.budget)
    print(json.dumps({"results": results, "before": before, "after": after,
                      "lives": list(lives.values()), "budgets": list(budgets.values())}))


if __name__ == "__main__":
    main(1 if "--retries" in sys.argv else 0)

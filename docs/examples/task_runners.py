"""Every task in its own scope instance: thread and process executors, a
multiprocessing pool and a Dask cluster, each with a bomb among its jobs.

    allocpolicy run --policy docs/examples/tasks_policy.toml -- python docs/examples/task_runners.py
"""

import allocpolicy
from allocpolicy.integrations.futures import ScopedProcessPoolExecutor, ScopedThreadPoolExecutor
from allocpolicy.integrations.pool import ScopedPool


def job(n: int) -> int:
    """Builds n MiB; a job the client asks 10 GiB of is a bomb."""
    return len(bytearray(n << 20)) >> 20


JOBS = [1, 2, 10240, 3]  # MiB


def outcome(get) -> str:
    try:
        return f"{get()} MiB"
    except allocpolicy.AllocError as err:
        return f"AllocError in {err.scope!r} ({err.size >> 20} MiB refused)"


def main() -> None:
    with ScopedThreadPoolExecutor(max_workers=2, scope="job") as pool:
        print("threads:  ", [outcome(f.result) for f in [pool.submit(job, n) for n in JOBS]])

    with ScopedProcessPoolExecutor(max_workers=2, scope="job") as pool:
        print("processes:", [outcome(f.result) for f in [pool.submit(job, n) for n in JOBS]])

    with ScopedPool(2, scope="job") as pool:
        print("pool:     ", [outcome(r.get) for r in [pool.apply_async(job, (n,)) for n in JOBS]])

    from distributed import Client, LocalCluster

    from allocpolicy.integrations.dask import AllocPolicyPlugin

    with LocalCluster(n_workers=1, threads_per_worker=2, memory_limit="2 GiB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.register_plugin(AllocPolicyPlugin(scope="job"))
        futures = client.map(job, JOBS, pure=False)
        print("dask:     ", [outcome(f.result) for f in futures])
        pid_before = client.run(lambda: __import__("os").getpid())
        budget = client.run(lambda: allocpolicy.stats().process.budget)
        print("dask worker's process budget:", list(budget.values())[0] >> 20, "MiB of a 2048 MiB memory_limit")
        print("same worker after the bomb:", client.run(lambda: __import__("os").getpid()) == pid_before)


if __name__ == "__main__":
    main()

"""Requests per second of a web app, without and with the runtime, side by
side in one run.

    python benchmarks/web_requests.py [--lib PATH] [--quick]
    python benchmarks/run.py --only web

Two servers, the same small request (read a parameter, build and serialise a
JSON document of a few KiB): Flask under gunicorn (web_app.py, one gthread
worker with 4 threads) and Starlette under uvicorn (web_asgi_app.py). Each in
three variants:

plain       no preload, no middleware
preload     under the preloaded runtime (built-in default policy), no middleware
protected   under the runtime, behind the integration: each request in its own
            instance of scope "request" (Flask: AllocPolicy(app), every view a
            task boundary; Starlette: the ASGI middleware, measured when the
            installed allocpolicy has scopes that follow asyncio tasks)

The three servers of a kind run at once on loopback ports; each round sends the same
number of requests to each, in rotated order, from 4 client threads on
keep-alive connections, and times them; it also reads the CPU time the
server's processes used (/proc), per request, which the load of a shared
machine moves much less than the rate. The figures are medians over the
rounds.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

VARIANTS = {
    "plain": "no preload, no middleware",
    "preload": "runtime preloaded, no middleware",
    "protected": "runtime preloaded, the integration",
}
#: server -> (what it is, its command line for a port)
SERVERS = {
    "flask": (
        "Flask under gunicorn (gthread, 1 worker x 4 threads)",
        lambda port: [sys.executable, "-m", "gunicorn", "--no-control-socket", "-k", "gthread", "-w", "1",
                      "--threads", "4", "--log-level", "warning", "-b", f"127.0.0.1:{port}", "web_app:app"],
    ),
    "starlette": (
        "Starlette under uvicorn (1 process)",
        lambda port: [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
                      "--log-level", "warning", "web_asgi_app:app"],
    ),
}
CLIENTS = 4
PATH = "/work?n=50"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(server: str, variant: str, lib: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_") and k != "LD_PRELOAD"}
    env["PYTHONPATH"] = str(HERE)
    command = SERVERS[server][1](port)
    if variant != "plain":
        # As a user runs it, with the built-in default policy and this library.
        command = [sys.executable, "-m", "allocpolicy", "run", "--", *command]
        env["ALLOCPOLICY_LIBRARY"] = str(lib)
    if variant == "protected":
        env["BENCH_PROTECT"] = "1"
    proc = subprocess.Popen(
        command,
        env=env, cwd=str(HERE), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            _requests(port, 1)
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{server} {variant}: the server exited: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{server} {variant}: the server did not answer in 60 s")


def _requests(port: int, n: int) -> None:
    """``n`` requests on one keep-alive connection; each must succeed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for _ in range(n):
            conn.request("GET", PATH)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status}")
    finally:
        conn.close()


_TICK = os.sysconf("SC_CLK_TCK")


def _server_cpu(session: int) -> float:
    """CPU seconds used so far by the server's processes (its session)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[3]) == session:  # field 6 of stat(5): the session id
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICK


def _round(proc: subprocess.Popen, port: int, per_client: int) -> tuple[float, float]:
    """Requests per second of one round from CLIENTS threads, and the
    server's CPU microseconds per request (less sensitive to the load of a
    shared machine than the rate)."""
    n = CLIENTS * per_client
    cpu = _server_cpu(proc.pid)
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        started = time.perf_counter()
        list(pool.map(lambda _: _requests(port, per_client), range(CLIENTS)))
        rate = n / (time.perf_counter() - started)
    return rate, (_server_cpu(proc.pid) - cpu) / n * 1e6


def measure(lib: Path, *, quick: bool = False, repeats: int = 7) -> dict:
    """Every server kind that can run here, each in its three variants."""
    out = {}
    for server in SERVERS:
        problem = _cannot_run(server)
        out[server] = {"skipped": problem} if problem else _measure_server(server, lib, quick, repeats)
    return out


def _cannot_run(server: str) -> str | None:
    import importlib.util

    import allocpolicy

    needs = {"flask": ["flask", "gunicorn"], "starlette": ["starlette", "uvicorn"]}[server]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {', '.join(missing)}"
    if server == "starlette" and not hasattr(allocpolicy.task, "__aenter__"):
        return "this allocpolicy has no scopes that follow asyncio tasks"
    return None


def _measure_server(server: str, lib: Path, quick: bool, repeats: int) -> dict:
    per_client = 100 if quick else 500
    servers = {}
    try:
        for variant in VARIANTS:
            servers[variant] = _start(server, variant, lib)
        for proc, port in servers.values():
            _round(proc, port, 50)  # warm up: imports, caches, connections
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
        order = list(VARIANTS)
        for r in range(repeats):
            for variant in order[r % len(order):] + order[: r % len(order)]:
                rate, us = _round(*servers[variant], per_client)
                samples[variant].append(rate)
                cpu[variant].append(us)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    base = statistics.median(samples["plain"])
    base_cpu = statistics.median(cpu["plain"])
    return {
        "requests_per_round": CLIENTS * per_client,
        "clients": CLIENTS,
        "samples_rps": samples,
        "median_rps": {v: statistics.median(s) for v, s in samples.items()},
        "ratio_to_plain": {v: statistics.median(s) / base for v, s in samples.items()},
        "samples_cpu_us": cpu,
        "median_cpu_us": {v: statistics.median(s) for v, s in cpu.items()},
        "cpu_ratio_to_plain": {v: statistics.median(s) / base_cpu for v, s in cpu.items()},
    }


def report(results: dict) -> str:
    """The side-by-side tables of :func:`measure`'s result."""
    return "\n".join(_report_server(server, res) for server, res in results.items())


def _report_server(server: str, res: dict) -> str:
    what = SERVERS[server][0]
    if "skipped" in res:
        return f"\n{what}: skipped ({res['skipped']})"
    lines = [
        f"\n{what}: requests/s, median of "
        f"{len(res['samples_rps']['plain'])} rounds of {res['requests_per_round']} requests "
        f"from {res['clients']} clients",
        f"  {'variant':<10} {'req/s':>8} {'vs plain':>9} {'server CPU us/req':>18} {'vs plain':>9}  what",
    ]
    for variant, what in VARIANTS.items():
        lines.append(
            f"  {variant:<10} {res['median_rps'][variant]:8.0f} {res['ratio_to_plain'][variant]:9.3f} "
            f"{res['median_cpu_us'][variant]:18.0f} {res['cpu_ratio_to_plain'][variant]:9.3f}  {what}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--lib", help="runtime library (default: the installed package's)")
    args = parser.parse_args(argv)
    if args.lib:
        lib = Path(args.lib).resolve()
    else:
        from allocpolicy import _native

        lib = Path(_native.library_path())
    print(report(measure(lib, quick=args.quick, repeats=3 if args.quick else args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

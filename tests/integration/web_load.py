"""Running a real server under ``allocpolicy run`` and sending it ordinary
requests with memory bombs among them, from concurrent clients.

    with Server(["gunicorn", "flask_app:app", ...], policy=WEB_POLICY) as server:
        results = send(server.url, mixed_requests(300), clients=8)
        check_results(results)

The apps live in ``tests/integration/apps``; every framework's app serves the
same routes (see ``apps/work.py``).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

APPS = Path(__file__).resolve().parent / "apps"
WEB_POLICY = APPS / "web_policy.toml"
BUDGET = 64 << 20  # the request scope's budget in WEB_POLICY
START_TIMEOUT = 60
REQUEST_TIMEOUT = 60
#: Live bytes the request scope may differ by from its baseline at the end:
#: unpublished per-thread batches (at most 1/32 of the budget per thread, see
#: allocpolicy.stats) and the stats request's own objects. A bomb that leaked
#: would leave tens of MiB.
LIVE_SLACK = 4 << 20

sys.path.insert(0, str(APPS))
import work  # noqa: E402  (the PNG builder, shared with the apps)

sys.path.remove(str(APPS))


@dataclass(frozen=True)
class Request:
    kind: str  #: "normal" or the bomb's name
    method: str
    path: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    expect: int = 200
    send_body: bool = True  #: False: only the headers go out (a declared huge body)
    cut: bool = False  #: the response starts, then the connection closes mid-body


NORMAL = [
    Request("normal", "GET", "/hello?name=a"),
    Request("normal", "GET", "/repeat?n=100000"),
    Request("normal", "GET", "/array?rows=200&cols=300"),
    Request("normal", "POST", "/image", work.png(320, 200), (("Content-Type", "image/png"),)),
    Request("normal", "POST", "/echo", os.urandom(20_000)),
]

DECLARED = 512 << 20  # the Content-Length of the body that is never sent
BOMB_PNG = work.png(12_000, 12_000)  # 144 MB of pixels behind a few hundred bytes


def bombs(status: int = 507) -> list[Request]:
    return [
        Request("bytes", "GET", f"/repeat?n={10 ** 10}", expect=status),
        Request("numpy", "GET", "/array?rows=100000&cols=100000", expect=status),
        Request("image", "POST", "/image", BOMB_PNG, (("Content-Type", "image/png"),), expect=status),
        Request("grow", "GET", "/grow", expect=status),
        Request(
            "body", "POST", "/echo", None, (("Content-Length", str(DECLARED)),), expect=413, send_body=False
        ),
    ]


def mixed_requests(
    n_normal: int, every: int = 12, status: int = 507, extra_bombs=(), without=()
) -> list[Request]:
    """``n_normal`` ordinary requests with a bomb after every ``every``-th,
    cycling through the kinds of bomb (leaving out the kinds ``without``)."""
    kinds = [b for b in bombs(status) if b.kind not in without] + list(extra_bombs)
    out: list[Request] = []
    for i in range(n_normal):
        out.append(NORMAL[i % len(NORMAL)])
        if i % every == every - 1:
            out.append(kinds[(i // every) % len(kinds)])
    return out


@dataclass
class Result:
    request: Request
    status: int | None
    body: bytes
    error: str | None = None


def _one(host: str, port: int, req: Request) -> Result:
    conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT)
    try:
        conn.putrequest(req.method, req.path)
        names = {name.lower() for name, _ in req.headers}
        for name, value in req.headers:
            conn.putheader(name, value)
        if req.body is not None and "content-length" not in names:
            conn.putheader("Content-Length", str(len(req.body)))
        conn.endheaders()
        if req.body is not None and req.send_body:
            conn.send(req.body)
        resp = conn.getresponse()
        status = resp.status
        return Result(req, status, resp.read())
    except (OSError, http.client.HTTPException) as exc:
        # A response cut short (the server closed the connection mid-body)
        # keeps its status, with no body.
        return Result(req, locals().get("status"), b"", f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def send(url: tuple[str, int], requests: list[Request], clients: int = 8) -> list[Result]:
    host, port = url
    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(lambda r: _one(host, port, r), requests))


def check_results(results: list[Result]) -> None:
    """Every ordinary request succeeded; every bomb failed with its status,
    its refusal's facts in the body."""
    wrong = [
        f"{r.request.kind} {r.request.method} {r.request.path}: got {r.status} {r.error or r.body[:300]!r}, "
        f"expected {r.request.expect}" + (" cut short" if r.request.cut else "")
        for r in results
        if r.status != r.request.expect or r.request.cut != (r.error is not None)
    ]
    assert not wrong, f"{len(wrong)} of {len(results)} requests went wrong:\n" + "\n".join(wrong[:20])
    for r in results:
        if r.request.kind == "normal" or r.request.cut:
            continue
        facts = json.loads(r.body)
        assert facts["scope"] == "request", facts
        assert facts["budget"] == BUDGET, facts
        if r.request.expect == 413:
            assert facts["size"] == declared_length(r.request), facts
        else:
            assert facts["reason"] == "budget" and facts["size"] > 0, facts
            assert facts["size"] + facts["live"] > BUDGET, facts


def declared_length(req: Request) -> int:
    """The ``Content-Length`` a request declares: its header, else its body's."""
    for name, value in req.headers:
        if name.lower() == "content-length":
            return int(value)
    return len(req.body or b"")


def refusal_lines(output: str) -> int:
    """Log lines of refused requests (answered or cut short)."""
    return output.count(" refused with ") + output.count(" refused after its response started")


#: A streamed response that bombs after its first chunk: the status is sent,
#: so the connection is closed instead.
LATE_BOMB = Request("late", "GET", "/stream", expect=200, cut=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ALLOCPOLICY_") and k not in ("LD_PRELOAD", "PYTHONMALLOC")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(APPS)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Server:
    """A server command run under ``allocpolicy run --policy POLICY``, on a
    free loopback port (``{port}`` in the command is replaced by it)."""

    def __init__(self, command: list[str], *, policy: Path = WEB_POLICY, preload: bool = True,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = ("127.0.0.1", self.port)
        command = [arg.replace("{port}", str(self.port)) for arg in command]
        if preload:
            command = [sys.executable, "-m", "allocpolicy", "run", "--policy", str(policy), "--", *command]
        self.command = command
        self.env = {**child_env(), **(env or {})}
        self.output = ""

    def __enter__(self) -> "Server":
        self._log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            self.command, cwd=str(APPS), env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                self._collect()
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output}")
            try:
                if _one(*self.url, Request("probe", "GET", "/hello")).status == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError(f"server did not answer within {START_TIMEOUT}s:\n{self.output}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stats(self, workers: int = 1, attempts: int = 60) -> dict[int, dict]:
        """The request scope's counters per worker process (pid), asking
        until ``workers`` different processes answered."""
        seen: dict[int, dict] = {}
        # With several workers, as many requests at once, each holding its
        # worker a moment: one after another, the worker that is awake may
        # take them all.
        path = "/stats" if workers == 1 else "/stats?hold=0.2"
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in range(attempts):
                for r in pool.map(lambda _: _one(*self.url, Request("stats", "GET", path)), range(workers)):
                    assert r.status == 200, (r.status, r.error, r.body)
                    facts = json.loads(r.body)
                    seen[facts["pid"]] = facts
                if len(seen) >= workers:
                    break
        return seen

    def _collect(self) -> None:
        self._log.seek(0)
        self.output = self._log.read()

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._collect()
        self._log.close()


def check_live_back(before: dict[int, dict], after: dict[int, dict]) -> None:
    """The request scope's live bytes are back at their baseline in every worker."""
    for pid, facts in after.items():
        if pid in before:
            grown = facts["live"] - before[pid]["live"]
            assert grown <= LIVE_SLACK, f"worker {pid}: request scope holds {grown} bytes more than at the start"


@dataclass
class Bombarded:
    """What a server did with ordinary requests and bombs (see :func:`bombard`)."""

    requests: list[Request]
    results: list[Result]
    before: dict[int, dict]  #: the request scope's counters per worker, warm, before the bombs
    after: dict[int, dict]
    alive: bool
    output: str  #: the server's log


def bombard(command: list[str], requests: list[Request], workers: int = 1,
            env: dict[str, str] | None = None) -> Bombarded:
    """Start the server, warm it, note its counters, send ``requests`` from 8
    clients at once, and note the counters again."""
    with Server(command, env=env) as srv:
        send(srv.url, mixed_requests(20, every=1000), clients=4)
        before = srv.stats(workers)
        results = send(srv.url, requests, clients=8)
        after = srv.stats(workers)
        alive = srv.alive()
    return Bombarded(requests, results, before, after, alive, srv.output)


def check_survived(run: Bombarded) -> None:
    """Each bomb failed alone with its status and facts and was logged, the
    server lives, the runtime refused the bombs, and the request scope's live
    bytes are back at their baseline."""
    check_results(run.results)
    assert run.alive, run.output
    n_bombs = sum(1 for r in run.requests if r.kind != "normal")
    assert refusal_lines(run.output) == n_bombs, run.output[-3000:]
    # A 413 is answered before anything is allocated: no refusal for it.
    refused = sum(1 for r in run.requests if r.expect == 507)
    assert sum(f["violations"] for f in run.after.values()) >= refused
    check_live_back(run.before, run.after)


def gunicorn_workers(output: str) -> set[int]:
    """The pids of the workers gunicorn booted, from its log."""
    return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", output)}

"""ASGI: FastAPI and Starlette under uvicorn (the default event loop and
uvloop), under ``allocpolicy run``, with memory bombs among hundreds of
ordinary requests from concurrent clients, including a handler that grows
across awaits (other requests run between its steps), bombs in sync
endpoints run in the thread pool and in code behind
``@app.middleware("http")``.

Every ordinary request succeeds; every bomb fails alone (507 with the
refusal's facts, 413 for a declared body over the budget, unread) and is
logged; the server lives on; the request scope's live bytes are back at
their baseline.
"""

from __future__ import annotations

import sys

import pytest

from web_load import LATE_BOMB, Request, Server, check_live_back, check_results, mixed_requests, refusal_lines, send

pytestmark = [pytest.mark.server, pytest.mark.slow]

pytest.importorskip("uvicorn")

import allocpolicy  # noqa: E402

if not hasattr(allocpolicy.task, "__aenter__"):
    pytest.skip("needs scope instances that follow asyncio tasks (async with allocpolicy.task)",
                allow_module_level=True)

ASYNC_BOMBS = [Request("grow_async", "GET", "/grow_async", expect=507), LATE_BOMB]
#: A streamed response refused memory after it started, which catches the
#: refusal and finishes: to the client an ordinary, complete response (the
#: middleware holds its final body message back until the endpoint is done).
HANDLED = [Request("normal", "GET", "/stream_handled")]
MIDDLEWARE_BOMB = [Request("middleware", "GET", "/hello", headers=(("X-Bomb", str(10**10)),), expect=507)]

# case -> (framework, app, event loop, extra bombs, environment)
CASES = {
    "fastapi-asyncio": ("fastapi", "fastapi_app:app", "asyncio", ASYNC_BOMBS + HANDLED, {}),
    "fastapi-uvloop": ("fastapi", "fastapi_app:app", "uvloop", ASYNC_BOMBS + HANDLED, {}),
    "starlette-asyncio": ("starlette", "starlette_app:app", "asyncio", ASYNC_BOMBS, {}),
    # BaseHTTPMiddleware runs the endpoint in a task of its own: its refusal
    # reaches the request's boundary in a later step of the request's task
    # (answered 507, as the middleware's own bomb is). It relays a streamed
    # body through a stream of its own, which it ends when the endpoint fails,
    # before raising the failure: the late bomb must still be cut short.
    "fastapi-http-middleware": (
        "fastapi", "fastapi_app:app", "asyncio", ASYNC_BOMBS + MIDDLEWARE_BOMB + HANDLED, {"APP_HTTP_MIDDLEWARE": "1"},
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_asgi_server_survives_bombs(case):
    framework, app, loop, extra, env = case
    pytest.importorskip(framework)
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    command = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--loop", loop,
               "--log-level", "warning", app]
    requests = mixed_requests(300, every=10, extra_bombs=extra)
    n_bombs = sum(1 for r in requests if r.kind != "normal")
    with Server(command, env=env) as srv:
        send(srv.url, mixed_requests(20, every=1000), clients=4)
        before = srv.stats()
        results = send(srv.url, requests, clients=8)
        after = srv.stats()
        alive = srv.alive()
    check_results(results)
    assert alive, srv.output
    assert refusal_lines(srv.output) == n_bombs, srv.output[-3000:]
    assert set(before) == set(after)  # one process from start to end
    refused = sum(1 for r in requests if r.expect == 507)
    assert sum(f["violations"] for f in after.values()) >= refused
    check_live_back(before, after)

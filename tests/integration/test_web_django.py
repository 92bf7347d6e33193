"""Django under gunicorn (sync workers), and under uvicorn (ASGI), under ``allocpolicy run``, with
memory bombs among hundreds of ordinary requests from concurrent clients.

Every ordinary request succeeds; every bomb fails alone (507 with the
refusal's facts instead of Django's 500 page, 413 for a declared body over
the budget, unread; a streamed body refused after its first chunk is cut
short) and is logged; the server keeps the workers it booted; the request
scope's live bytes are back at their baseline.
"""

from __future__ import annotations

import re
import sys

import pytest

from web_load import LATE_BOMB, Server, check_live_back, check_results, mixed_requests, refusal_lines, send

pytestmark = [pytest.mark.server, pytest.mark.slow]

pytest.importorskip("django")

GUNICORN = [
    sys.executable, "-m", "gunicorn", "--no-control-socket", "-b", "127.0.0.1:{port}",
    "-k", "sync", "-w", "2", "django_app:application",
]
UVICORN = [
    sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning",
    "django_app:asgi_application",
]

# server -> (command, worker processes, bombs it cannot be sent)
SERVERS = {
    "gunicorn-sync": (GUNICORN, 2, ()),
    # Under ASGI Django reads the whole body before any middleware runs, so no
    # middleware can refuse a declared length unread (docs/web.rst).
    "uvicorn-asgi": (UVICORN, 1, ("body",)),
}


def _worker_pids(output: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", output)}


@pytest.mark.parametrize("server", list(SERVERS.values()), ids=list(SERVERS))
def test_django_server_survives_bombs(server):
    command, workers, without = server
    pytest.importorskip("gunicorn" if command is GUNICORN else "uvicorn")
    requests = mixed_requests(240, without=without, extra_bombs=[LATE_BOMB])
    n_bombs = sum(1 for r in requests if r.kind != "normal")
    assert {r.kind for r in requests} >= {"bytes", "numpy", "image", "grow", "late"}
    with Server(command) as srv:
        # GIVEN a warm server and its baseline
        send(srv.url, mixed_requests(20, every=1000), clients=4)
        before = srv.stats(workers)
        # WHEN bombs arrive among ordinary requests from 8 clients at once
        results = send(srv.url, requests, clients=8)
        after = srv.stats(workers)
        alive = srv.alive()
    # THEN each bomb failed alone with its status and facts, and was logged
    check_results(results)
    assert alive, srv.output
    assert refusal_lines(srv.output) == n_bombs, srv.output[-3000:]
    # Django's own 500 page never answered a refusal
    assert "Internal Server Error" not in srv.output, srv.output[-3000:]
    # the workers are those that booted first: none died and was replaced
    if command is GUNICORN:
        assert _worker_pids(srv.output) == set(after) and len(after) == workers, srv.output[-3000:]
    else:
        assert set(before) == set(after)  # one process from start to end
    # the runtime refused them (a 413 is answered before anything is allocated)
    refused = sum(1 for r in requests if r.expect == 507)
    assert sum(f["violations"] for f in after.values()) >= refused
    check_live_back(before, after)

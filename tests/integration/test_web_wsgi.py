"""WSGI: Flask under gunicorn (sync and gthread workers) and waitress, under
``allocpolicy run``, with memory bombs among hundreds of ordinary requests
from concurrent clients.

Every ordinary request succeeds; every bomb fails alone (507 with the
refusal's facts, 413 for a declared body over the budget, unread) and is
logged; the server and its workers live on; the request scope's live bytes
are back at their baseline.
"""

from __future__ import annotations

import re
import sys

import pytest

from web_load import LATE_BOMB, Server, check_live_back, check_results, mixed_requests, refusal_lines, send

pytestmark = [pytest.mark.server, pytest.mark.slow]

pytest.importorskip("flask")

GUNICORN = [sys.executable, "-m", "gunicorn", "--no-control-socket", "-b", "127.0.0.1:{port}"]

# server -> (command, worker processes, bombs it cannot be sent)
SERVERS = {
    "gunicorn-sync": (GUNICORN + ["-k", "sync", "-w", "2", "flask_app:app"], 2, ()),
    "gunicorn-gthread": (GUNICORN + ["-k", "gthread", "-w", "1", "--threads", "4", "flask_app:app"], 1, ()),
    # waitress reads the whole body before it calls the application, so no
    # middleware can refuse a declared length unread: its own
    # max_request_body_size does (docs/web.rst).
    "waitress": (
        [sys.executable, "-m", "waitress", "--threads=4", "--listen=127.0.0.1:{port}", "flask_app:app"],
        1,
        ("body",),
    ),
}


def _worker_pids(output: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", output)}


@pytest.mark.parametrize("server", list(SERVERS))
def test_flask_server_survives_bombs(server):
    pytest.importorskip("gunicorn" if server.startswith("gunicorn") else "waitress")
    command, workers, without = SERVERS[server]
    requests = mixed_requests(240, without=without, extra_bombs=[LATE_BOMB])
    n_bombs = sum(1 for r in requests if r.kind != "normal")
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
    # the workers are those that booted first: none died and was replaced
    if server.startswith("gunicorn"):
        assert _worker_pids(srv.output) == set(after) and len(after) == workers, srv.output[-3000:]
    # the runtime refused them (a 413 is answered before anything is allocated)
    refused = sum(1 for r in requests if r.expect == 507)
    assert sum(f["violations"] for f in after.values()) >= refused
    check_live_back(before, after)

"""Django under gunicorn (sync workers), under ``allocpolicy run``, with
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
pytest.importorskip("gunicorn")

WORKERS = 2
COMMAND = [
    sys.executable, "-m", "gunicorn", "--no-control-socket", "-b", "127.0.0.1:{port}",
    "-k", "sync", "-w", str(WORKERS), "django_app:application",
]


def _worker_pids(output: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", output)}


def test_django_server_survives_bombs():
    requests = mixed_requests(240, extra_bombs=[LATE_BOMB])
    n_bombs = sum(1 for r in requests if r.kind != "normal")
    assert {r.kind for r in requests} >= {"bytes", "numpy", "image", "grow", "body", "late"}
    with Server(COMMAND) as srv:
        # GIVEN a warm server and its baseline
        send(srv.url, mixed_requests(20, every=1000), clients=4)
        before = srv.stats(WORKERS)
        # WHEN bombs arrive among ordinary requests from 8 clients at once
        results = send(srv.url, requests, clients=8)
        after = srv.stats(WORKERS)
        alive = srv.alive()
    # THEN each bomb failed alone with its status and facts, and was logged
    check_results(results)
    assert alive, srv.output
    assert refusal_lines(srv.output) == n_bombs, srv.output[-3000:]
    # Django's own 500 page never answered a refusal
    assert "Internal Server Error" not in srv.output, srv.output[-3000:]
    # the workers are those that booted first: none died and was replaced
    assert _worker_pids(srv.output) == set(after) and len(after) == WORKERS, srv.output[-3000:]
    # the runtime refused them (a 413 is answered before anything is allocated)
    refused = sum(1 for r in requests if r.expect == 507)
    assert sum(f["violations"] for f in after.values()) >= refused
    check_live_back(before, after)

"""Django under gunicorn (sync workers), and under uvicorn (ASGI), under ``allocpolicy run``, with
memory bombs among hundreds of ordinary requests from concurrent clients.

Every ordinary request succeeds; every bomb fails alone (507 with the
refusal's facts instead of Django's 500 page, 413 for a declared body over
the budget, unread; a streamed body refused after its first chunk is cut
short) and is logged; the server keeps the workers it booted; the request
scope's live bytes are back at their baseline.
"""

from __future__ import annotations

import sys

import pytest

from web_load import LATE_BOMB, bombard, check_survived, gunicorn_workers, mixed_requests

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


@pytest.mark.parametrize("server", list(SERVERS.values()), ids=list(SERVERS))
def test_django_server_survives_bombs(server):
    command, workers, without = server
    pytest.importorskip("gunicorn" if command is GUNICORN else "uvicorn")
    # GIVEN a warm server; WHEN bombs arrive among ordinary requests from 8 clients
    requests = mixed_requests(240, without=without, extra_bombs=[LATE_BOMB])
    assert {r.kind for r in requests} >= {"bytes", "numpy", "image", "grow", "late"}
    run = bombard(command, requests, workers)
    # THEN each bomb failed alone with its status and facts, and was logged;
    # the server lives and the request scope's live bytes are back
    check_survived(run)
    # Django's own 500 page never answered a refusal
    assert "Internal Server Error" not in run.output, run.output[-3000:]
    # the workers are those that booted first: none died and was replaced
    if command is GUNICORN:
        assert gunicorn_workers(run.output) == set(run.after) and len(run.after) == workers, run.output[-3000:]
    else:
        assert set(run.before) == set(run.after)  # one process from start to end

"""WSGI: Flask under gunicorn (sync and gthread workers) and waitress, under
``allocpolicy run``, with memory bombs among hundreds of ordinary requests
from concurrent clients.

Every ordinary request succeeds; every bomb fails alone (507 with the
refusal's facts, 413 for a declared body over the budget, unread) and is
logged; the server and its workers live on; the request scope's live bytes
are back at their baseline.
"""

from __future__ import annotations

import sys

import pytest

from web_load import LATE_BOMB, Request, bombard, check_survived, gunicorn_workers, mixed_requests

pytestmark = [pytest.mark.server, pytest.mark.slow]

#: A body over the budget that the client sends whole. waitress reads it into
#: its buffers (spooled to a file) before it calls the application, so the
#: middleware sees its length and answers 413, as a WSGI application may (no
#: hop-by-hop header: waitress answers 500 for one).
SENT_BODY = Request("sent_body", "POST", "/echo", b"y" * (80 << 20), expect=413)

pytest.importorskip("flask")

GUNICORN = [sys.executable, "-m", "gunicorn", "--no-control-socket", "-b", "127.0.0.1:{port}"]

# server -> (command, worker processes, bombs it cannot be sent, bombs for it alone)
SERVERS = {
    "gunicorn-sync": (GUNICORN + ["-k", "sync", "-w", "2", "flask_app:app"], 2, (), ()),
    "gunicorn-gthread": (GUNICORN + ["-k", "gthread", "-w", "1", "--threads", "4", "flask_app:app"], 1, (), ()),
    # waitress reads the whole body before it calls the application, so no
    # middleware can refuse a declared length unread: its own
    # max_request_body_size does (docs/web.rst).
    "waitress": (
        [sys.executable, "-m", "waitress", "--threads=4", "--listen=127.0.0.1:{port}", "flask_app:app"],
        1,
        ("body",),
        (SENT_BODY,),
    ),
}


@pytest.mark.parametrize("server", list(SERVERS))
def test_flask_server_survives_bombs(server):
    pytest.importorskip("gunicorn" if server.startswith("gunicorn") else "waitress")
    command, workers, without, extra = SERVERS[server]
    # GIVEN a warm server; WHEN bombs arrive among ordinary requests from 8 clients
    run = bombard(command, mixed_requests(240, without=without, extra_bombs=[LATE_BOMB, *extra]), workers)
    # THEN each bomb failed alone with its status and facts, and was logged;
    # the server lives and the request scope's live bytes are back
    check_survived(run)
    # the workers are those that booted first: none died and was replaced
    if server.startswith("gunicorn"):
        assert gunicorn_workers(run.output) == set(run.after) and len(run.after) == workers, run.output[-3000:]

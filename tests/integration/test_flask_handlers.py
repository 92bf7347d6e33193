"""The Flask extension's paths other than a view's refusal answered 507, in
Flask's real request handling (its test client, through the WSGI middleware)
under ``allocpolicy run``: a configured status, an application's own
``AllocError`` handler reading the refusal's facts, a ``500`` handler finding
the refusal behind Flask's ``InternalServerError`` (a refusal in an
``after_request`` function), ``refusal()`` without an argument once the
request was answered, and an exception that is not a refusal.

The server test (``test_web_wsgi.py``) covers views under gunicorn and waitress.
"""

from __future__ import annotations

import json

import pytest

from runtime_run import check, run_python

pytest.importorskip("flask")

POLICY = """
version = 1
[scopes.request]
on_oom = "raise"
budget = "64 MiB"
"""

APP = r'''
import json
from flask import Flask, jsonify, request

import allocpolicy
from allocpolicy import AllocError
from allocpolicy.integrations.flask import AllocPolicy, refusal, refusal_facts

BOMB = 10 ** 10
SEEN_AT_TEARDOWN = []


def views(app):
    @app.get("/ok")
    def ok():
        return jsonify(length=len(b"x" * 1000))

    @app.get("/bomb")
    def bomb():
        return jsonify(length=len(b"x" * BOMB))

    @app.get("/plain")
    def plain():
        raise MemoryError("not the runtime's")

    @app.teardown_request
    def note(exc):
        SEEN_AT_TEARDOWN.append(None if refusal() is None else refusal().size)


# A configured status.
configured = Flask("configured")
AllocPolicy(configured, status=503)
views(configured)

# The application's own AllocError handler, registered after the extension.
own = Flask("own")
AllocPolicy(own)
views(own)


@own.errorhandler(AllocError)
def too_big(err):
    return {"message": "narrow the dates", **refusal_facts(err)}, 507


# A 500 handler of its own: a refusal in an after_request function reaches
# it as Flask's InternalServerError, which refusal() sees through.
server_error = Flask("server_error")
AllocPolicy(server_error)
views(server_error)


@server_error.after_request
def bomb_after(response):
    if request.path == "/ok" and request.args.get("after"):
        b"x" * BOMB
    return response


@server_error.errorhandler(500)
def page(error):
    err = refusal(error)
    facts = refusal_facts(err) if err is not None else {}
    return {"page": "mine", "refused": err is not None, **facts}, 500


def get(app, path):
    resp = app.test_client().get(path)
    return [resp.status_code, resp.get_json(silent=True)]


out = {}
for name, app in [("configured", configured), ("own", own), ("server_error", server_error)]:
    out[name] = dict(zip(["/ok", "/bomb", "/ok?after=1", "/plain", "again"],
                         [get(app, path) for path in ("/ok", "/bomb", "/ok?after=1", "/plain", "/ok")]))
out["teardown"] = SEEN_AT_TEARDOWN
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("flask")
    return json.loads(check(run_python(APP, POLICY, tmp_path)).splitlines()[-1])


def _refused(facts: dict) -> None:
    assert facts["scope"] == "request" and facts["reason"] == "budget", facts
    assert facts["size"] >= 10**10 and facts["budget"] == 64 << 20, facts


def test_a_configured_status_answers_the_refusal(answers):
    got = answers["configured"]
    assert got["/ok"] == [200, {"length": 1000}]
    status, facts = got["/bomb"]
    assert status == 503
    _refused(facts)
    # the requests after the refusal are served as before
    assert got["/ok?after=1"] == got["again"] == [200, {"length": 1000}]


def test_an_own_alloc_error_handler_reads_the_facts(answers):
    status, body = answers["own"]["/bomb"]
    assert status == 507 and body["message"] == "narrow the dates"
    _refused(body)
    assert answers["own"]["again"] == [200, {"length": 1000}]


def test_a_500_handler_finds_the_refusal_behind_internal_server_error(answers):
    got = answers["server_error"]
    status, body = got["/ok?after=1"]
    assert status == 500 and body["page"] == "mine" and body["refused"] is True, body
    _refused(body)
    # a view's refusal is still answered by the extension's AllocError handler
    assert got["/bomb"][0] == 507
    # a MemoryError the runtime did not make is no refusal
    assert got["/plain"] == [500, {"page": "mine", "refused": False}]
    assert got["again"] == [200, {"length": 1000}]


def test_refusal_without_an_argument_is_the_refusal_answered_in_the_request(answers):
    # per app: /ok, /bomb, /ok?after=1, /plain, /ok again
    seen = answers["teardown"]
    assert len(seen) == 15
    configured, own, server_error = seen[:5], seen[5:10], seen[10:]
    for per_app in (configured, server_error):
        assert per_app[0] is None and per_app[1] >= 10**10 and per_app[3:] == [None, None], seen
    # an own AllocError handler answers instead of the extension: nothing is noted
    assert own == [None] * 5, seen

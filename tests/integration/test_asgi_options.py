"""The ASGI middleware's options, in Starlette's real request handling (httpx's
ASGI transport) under ``allocpolicy run``: the refusal's status and the body
limit's status and size are the application's to choose, through
``add_middleware`` as through wrapping; an application wrapped whole, whose
own error middleware answers the failure before raising it, still gets the
refusal's status.

The server test (``test_web_asgi.py``) covers the defaults under uvicorn.
"""

from __future__ import annotations

import json

import pytest

from runtime_run import check, run_python

pytest.importorskip("starlette")
pytest.importorskip("httpx")

POLICY = """
version = 1
[scopes.upload]
on_oom = "raise"
budget = "64 MiB"
"""

APP = r'''
import asyncio, json, logging
import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from allocpolicy.integrations.asgi import AllocPolicyMiddleware

logged = []
logging.getLogger("allocpolicy.integrations").addHandler(logging.Handler())
logging.getLogger("allocpolicy.integrations").handlers[0].emit = lambda r: logged.append(r.getMessage())


async def repeat(request):
    return JSONResponse({"length": len(b"x" * int(request.query_params["n"]))})


async def echo(request):
    return JSONResponse({"length": len(await request.body())})


routes = [Route("/repeat", repeat), Route("/echo", echo, methods=["POST"])]
added = Starlette(routes=routes, middleware=[
    Middleware(AllocPolicyMiddleware, scope="upload", status=503, too_large_status=400, max_body=1000)])
# Wrapped whole: Starlette's ServerErrorMiddleware, inside, answers the
# refusal with its 500 page before raising it; the client gets the 507.
wrapped = AllocPolicyMiddleware(Starlette(routes=routes), "upload", max_body=None)


async def main():
    out = {}
    for name, app in (("added", added), ("wrapped", wrapped)):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
            answers = []
            for method, path, body in (("GET", "/repeat?n=1000", None), ("GET", f"/repeat?n={10**10}", None),
                                       ("POST", "/echo", b"y" * 5000), ("GET", "/repeat?n=2000", None)):
                r = await client.request(method, path, content=body)
                answers.append([r.status_code, r.json()])
            out[name] = answers
    out["logged"] = logged
    return out


print(json.dumps(asyncio.run(main())))
'''


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("asgi")
    return json.loads(check(run_python(APP, POLICY, tmp_path)).splitlines()[-1])


def test_statuses_and_body_limit_set_with_add_middleware(answers):
    ok, refused, too_large, again = answers["added"]
    assert ok == [200, {"length": 1000}] and again == [200, {"length": 2000}]
    status, facts = refused
    assert status == 503
    assert (facts["scope"], facts["reason"], facts["budget"]) == ("upload", "budget", 64 << 20), facts
    assert facts["size"] >= 10**10
    status, facts = too_large
    assert status == 400 and facts["size"] == 5000 and facts["budget"] == 1000, facts


def test_a_wrapped_application_without_a_body_limit(answers):
    ok, refused, echoed, again = answers["wrapped"]
    assert refused[0] == 507 and refused[1]["scope"] == "upload" and refused[1]["size"] >= 10**10
    assert echoed == [200, {"length": 5000}]
    assert ok[0] == again[0] == 200


def test_each_refusal_is_logged_with_its_status(answers):
    logged = answers["logged"]
    assert len(logged) == 3, logged
    assert "refused with 503" in logged[0] and "refused with 400" in logged[1]
    assert "refused with 507" in logged[2]

"""The Starlette app of the requests/s benchmark (web_requests.py): the same
request as web_app.py. ``BENCH_PROTECT=1`` puts it behind the ASGI middleware."""

import json
import os

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.routing import Route

from web_app import ROWS

middleware = []
if os.environ.get("BENCH_PROTECT") == "1":
    from allocpolicy.integrations.asgi import AllocPolicyMiddleware

    middleware.append(Middleware(AllocPolicyMiddleware))


async def work(request):
    n = int(request.query_params.get("n", 50))
    body = json.dumps({"rows": ROWS[:n], "total": sum(r["score"] for r in ROWS[:n])})
    return Response(body, media_type="application/json")


app = Starlette(routes=[Route("/work", work)], middleware=middleware)

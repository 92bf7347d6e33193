"""The FastAPI app of the web tests: ``allocpolicy run -- uvicorn fastapi_app:app``.

Sync endpoints (``def``) run in FastAPI's thread pool; ``async def`` ones on
the event loop; the ``@app.middleware("http")`` function runs in a task of
its own (Starlette's BaseHTTPMiddleware), added with APP_HTTP_MIDDLEWARE=1.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

import work
from allocpolicy.integrations.asgi import AllocPolicyMiddleware

app = FastAPI()


async def header_bomb(request: Request, call_next):
    """Code behind @app.middleware("http") that allocates what a header asks."""
    if "x-bomb" in request.headers:
        request.state.blob = b"x" * int(request.headers["x-bomb"])
    return await call_next(request)


if os.environ.get("APP_HTTP_MIDDLEWARE") == "1":
    # Starlette's BaseHTTPMiddleware: the endpoints then run in a task it starts.
    app.middleware("http")(header_bomb)


app.add_middleware(AllocPolicyMiddleware)


@app.get("/hello")
async def hello(request: Request):
    return work.hello(request.query_params)


@app.get("/repeat")
def repeat(request: Request):
    return work.repeat(request.query_params)


@app.get("/array")
async def array(request: Request):
    return work.array(request.query_params)


@app.post("/image")
async def image(request: Request):
    return work.image(await request.body())


@app.post("/echo")
async def echo(request: Request):
    return work.echo(await request.body())


@app.get("/grow")
def grow(request: Request):
    return work.grow(request.query_params)


@app.get("/grow_async")
async def grow_async(request: Request):
    return await work.grow_across_awaits(request.query_params)


@app.get("/stream")
def stream(request: Request):
    return StreamingResponse(work.stream(request.query_params), media_type="text/plain")


@app.get("/stream_handled")
def stream_handled(request: Request):
    return StreamingResponse(work.stream_handled(request.query_params), media_type="text/plain")


@app.get("/stats")
def stats(request: Request):
    return work.stats(request.query_params)

"""The Starlette app of the web tests: ``allocpolicy run -- uvicorn starlette_app:app``."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import work
from allocpolicy.integrations.asgi import AllocPolicyMiddleware


async def hello(request):
    return JSONResponse(work.hello(request.query_params))


async def repeat(request):
    # Handed to a thread: still this request's instance.
    return JSONResponse(await run_in_threadpool(work.repeat, request.query_params))


async def array(request):
    return JSONResponse(work.array(request.query_params))


async def image(request):
    return JSONResponse(work.image(await request.body()))


async def echo(request):
    return JSONResponse(work.echo(await request.body()))


def grow(request):  # a sync endpoint: Starlette runs it in its thread pool
    return JSONResponse(work.grow(request.query_params))


async def grow_async(request):
    return JSONResponse(await work.grow_across_awaits(request.query_params))


async def stream(request):
    return StreamingResponse(work.stream(request.query_params), media_type="text/plain")


def stats(request):
    return JSONResponse(work.stats(request.query_params))


app = Starlette(
    routes=[
        Route("/hello", hello),
        Route("/repeat", repeat),
        Route("/array", array),
        Route("/image", image, methods=["POST"]),
        Route("/echo", echo, methods=["POST"]),
        Route("/grow", grow),
        Route("/grow_async", grow_async),
        Route("/stream", stream),
        Route("/stats", stats),
    ],
    middleware=[Middleware(AllocPolicyMiddleware)],
)

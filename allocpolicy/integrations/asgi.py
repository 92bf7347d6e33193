"""ASGI middleware: every HTTP request in its own scope instance, one line::

    from allocpolicy.integrations.asgi import AllocPolicyMiddleware

    app.add_middleware(AllocPolicyMiddleware)          # Starlette, FastAPI
    app = AllocPolicyMiddleware(app, scope="request")  # any ASGI application

Run the server under the runtime (``allocpolicy run -- uvicorn app:app``). The
request's instance follows its task: everything the request runs, across its
``await``\\ s, in the tasks it starts and in the threads it hands work to (sync
endpoints, ``run_in_threadpool``, code behind ``@app.middleware("http")``), is
charged to it and to nothing else, while the other requests interleave on the
same event loop.

- A request that the policy refuses memory before its response has started
  is answered ``507 Insufficient Storage`` (configurable) with the refusal's
  facts as a JSON body, and logged.
- If the response has started, its status cannot change any more: the
  middleware logs the refusal and returns without finishing the response, so
  the server closes the connection (the client sees a truncated response,
  never a complete-looking one). Once a refusal was recorded in the
  request's instance, the response's start and its final body message wait
  for the application's outcome: a framework that answers the failure before
  raising it (Starlette's ServerErrorMiddleware, in an application wrapped
  whole) cannot turn the 507 into its 500, and one that ends the body on the
  failure (Starlette's BaseHTTPMiddleware) cannot make the response look
  complete.
- A request whose ``Content-Length`` is over the scope's budget is answered
  ``413`` before its body is received.

Lifespan and WebSocket connections pass through unscoped.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import allocpolicy

from .._core import stepping
from ._http import RequestGuard, find_refusal, refusal_facts

__all__ = ["AllocPolicyMiddleware", "refusal_facts", "find_refusal"]

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class AllocPolicyMiddleware:
    """Wrap the ASGI application ``app`` so that each HTTP request runs in
    ``async with allocpolicy.task(scope)``.

    The arguments after ``app`` (``scope``, and ``status``,
    ``too_large_status``, ``max_body``, ``logger`` by keyword) are those of
    :class:`allocpolicy.integrations.wsgi.AllocPolicyMiddleware`; Starlette's
    ``app.add_middleware(AllocPolicyMiddleware, scope="upload")`` passes them.
    """

    def __init__(
        self, app: Callable[[dict, Receive, Send], Awaitable[None]], scope: str = "request", **options: Any
    ) -> None:
        if not callable(app):
            raise TypeError(f"argument 'app' must be an ASGI application, not {type(app).__name__}")
        self.app = app
        self.guard = RequestGuard(scope, **options)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard = self.guard
        method, path = scope.get("method", ""), scope.get("root_path", "") + scope.get("path", "")
        length = _header(scope, b"content-length")
        limit = guard.too_large(length) if length is not None else None
        if limit is not None:
            # Answered without calling receive(): the body is never read.
            await _respond(send, guard.too_large_status, guard.rejected(length, limit, method, path), close=True)
            return
        started = False
        # The request's instance and its violation count at entry; see
        # send_and_note().
        instance: tuple[Any, int, int] | None = None
        held: list[dict] = []

        async def send_and_note(message: dict) -> None:
            nonlocal started
            kind = message["type"]
            if (
                kind == "http.response.start"
                or (kind == "http.response.body" and not message.get("more_body", False))
            ) and _refused_since(instance):
                # The request was refused memory, and the response is about to
                # start or to look complete. That may be a framework answering
                # the failure before it raises it: Starlette's
                # ServerErrorMiddleware sends its 500 page (an application
                # wrapped whole), BaseHTTPMiddleware ends the stream it relays
                # the body through. The message waits for the application's
                # outcome.
                held.append(message)
                return
            if held:
                # A body goes on after them: the application handled the
                # refusal and streams its response.
                await _send_held(held)
            started = started or kind == "http.response.start"
            await send(message)

        async def _send_held(messages: list[dict]) -> None:
            nonlocal started
            for m in messages:
                started = started or m["type"] == "http.response.start"
                await send(m)
            messages.clear()

        try:
            async with allocpolicy.task(guard.scope):
                instance = _instance()
                await self.app(scope, receive, send_and_note)
        except allocpolicy.AllocError as err:
            # What a framework sent for the failure is dropped.
            held.clear()
            if started:
                # Not re-raised: the server would log it again as a crash of
                # the application. Returning with the response unfinished
                # makes it close the connection.
                guard.refused_late(err, method, path)
                return
            await _respond(send, guard.status, guard.refused(err, method, path))
            return
        if held:
            # The application returned: whoever caught the refusal handled it,
            # and the response is the one it meant to send.
            await _send_held(held)


def _instance() -> tuple[Any, int, int] | None:
    """(runtime, instance, violations so far) of the running task's innermost
    scope instance, or ``None`` outside a task the runtime follows."""
    frame = stepping.current()
    if frame is None:
        return None
    stats = frame.rt.instance_stats(frame.instance)
    return frame.rt, frame.instance, stats.violations if stats is not None else 0


def _refused_since(instance: tuple[Any, int, int] | None) -> bool:
    """Whether the runtime recorded a refusal in ``instance`` since it was noted.

    The instance's own count, not the thread's record: the refusal may have
    been made in a task the request started or in a thread it handed work to,
    and other requests' refusals on this thread are not this one's."""
    if instance is None:
        return False
    rt, handle, before = instance
    stats = rt.instance_stats(handle)
    return stats is not None and stats.violations > before


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


async def _respond(send: Send, status: int, body: bytes, close: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        # The unread body is still on the connection.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})

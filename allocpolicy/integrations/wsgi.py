"""WSGI middleware: every request in its own scope instance, one line::

    from allocpolicy.integrations.wsgi import AllocPolicyMiddleware

    application = AllocPolicyMiddleware(application)          # scope "request"

Run the server under the runtime (``allocpolicy run -- gunicorn app:application``).
A request that the policy refuses memory is answered ``507 Insufficient
Storage`` with the refusal's facts as a JSON body, and logged; the other
requests, in the same process, go on. A request whose ``Content-Length`` is
over the scope's budget is answered ``413`` before its body is read.

The scope instance covers the application call and the iteration of the
response body, whichever thread the server iterates it in; if the refusal
comes after the first body bytes went out, the status cannot change any
more, and the connection is closed (the server sees the error).

Frameworks that turn every exception into their own ``500`` page need one
more step so that the refusal reaches the middleware: see
:mod:`allocpolicy.integrations.flask`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import allocpolicy

from ._http import BUDGET, RequestGuard, find_refusal, refusal_facts

__all__ = ["AllocPolicyMiddleware", "refusal_facts", "find_refusal"]

_END = object()


class AllocPolicyMiddleware:
    """Wrap the WSGI application ``app`` so that each request runs in
    :func:`allocpolicy.task` (``scope``) and a refusal is answered with
    ``status``.

    Args:
        app: the WSGI application.
        scope: the scope each request runs in; the policy must declare it.
        status: status of the answer to a refused request (default 507).
        too_large_status: status of the answer to a request whose
            ``Content-Length`` is over ``max_body`` (default 413).
        max_body: the largest ``Content-Length`` accepted: ``"budget"``
            (the scope's budget), a number of bytes, or ``None``.
        logger: where refusals are logged (default ``allocpolicy.integrations``).
    """

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        scope: str = "request",
        *,
        status: int = 507,
        too_large_status: int = 413,
        max_body: int | str | None = BUDGET,
        logger=None,
    ) -> None:
        if not callable(app):
            raise TypeError(f"argument 'app' must be a WSGI application, not {type(app).__name__}")
        self.app = app
        self.guard = RequestGuard(
            scope, status=status, too_large_status=too_large_status, max_body=max_body, logger=logger
        )

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        guard = self.guard
        length = environ.get("CONTENT_LENGTH")
        limit = guard.too_large(length) if length else None
        if limit is not None:
            # Answered without touching wsgi.input: the body is never read.
            body = guard.rejected(length, limit, environ.get("REQUEST_METHOD", ""), _path(environ))
            start_response(guard.too_large_line, _headers(body))
            return [body]
        try:
            with allocpolicy.task(guard.scope):
                result = self.app(environ, start_response)
                if isinstance(result, (list, tuple)):
                    return result
                # The body may still do the work (a generator): its iteration
                # runs in this request's instance too, in whatever thread the
                # server iterates it.
                step = allocpolicy.bind(_stepper(iter(result)))
        except allocpolicy.AllocError as err:
            return self._refuse(err, environ, start_response)
        return _ScopedBody(self, result, step, environ, start_response)

    def _refuse(self, err, environ, start_response) -> list[bytes]:
        body = self.guard.refused(err, environ.get("REQUEST_METHOD", ""), _path(environ))
        # exc_info: the application may have called start_response already;
        # PEP 3333 lets a second call replace those headers while none are sent.
        start_response(self.guard.status_line, _headers(body), (type(err), err, err.__traceback__))
        return [body]


def _stepper(it: Iterator[bytes]) -> Callable[[], Any]:
    def step():
        return next(it, _END)

    return step


class _ScopedBody:
    """The response body, iterated in the request's instance."""

    def __init__(self, mw: AllocPolicyMiddleware, result, step, environ, start_response) -> None:
        self._mw = mw
        self._result = result
        self._step = step
        self._environ = environ
        self._start_response = start_response

    def __iter__(self) -> Iterator[bytes]:
        started = False
        while True:
            try:
                chunk = self._step()
            except allocpolicy.AllocError as err:
                if started:
                    environ = self._environ
                    self._mw.guard.refused_late(err, environ.get("REQUEST_METHOD", ""), _path(environ))
                    raise
                yield from self._mw._refuse(err, self._environ, self._start_response)
                return
            if chunk is _END:
                return
            # The server sends the headers with the first non-empty chunk.
            started = started or bool(chunk)
            yield chunk

    def close(self) -> None:
        # Dropping the bound stepper releases the request's instance.
        self._step = None
        close = getattr(self._result, "close", None)
        self._result = None
        if close is not None:
            close()


def _headers(body: bytes) -> list[tuple[str, str]]:
    # No "Connection: close" for the unread body of a 413: PEP 3333 forbids
    # hop-by-hop headers to applications (waitress answers 500 instead,
    # gunicorn drops the header); the server discards or closes on its own.
    return [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]


def _path(environ: dict[str, Any]) -> str:
    return environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")


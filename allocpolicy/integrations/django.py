"""Django: each request in its own scope instance, one line in the settings::

    MIDDLEWARE = [
        "allocpolicy.integrations.django.AllocPolicyMiddleware",   # first
        "django.middleware.security.SecurityMiddleware",
        ...
    ]

Run the server under the runtime (``allocpolicy run -- gunicorn mysite.wsgi``).
A request that the policy refuses memory is answered ``507 Insufficient
Storage`` with the refusal's facts as a JSON body, and logged; the other
requests, in the same process, go on. A request whose ``Content-Length`` is
over the scope's budget is answered ``413`` before its body is read.

Django turns an exception into its ``500`` page inside every middleware layer,
so the refusal never reaches a ``with`` block around the application. The
middleware therefore recognises it where Django hands exceptions over: in its
``process_exception`` (a view, or the rendering of a ``TemplateResponse``), and
in a ``got_request_exception`` receiver for the code of the other middleware,
whose ``500`` it then answers with the ``507``. Put it first in
``MIDDLEWARE``, so that the instance covers every other middleware too.

The middleware is synchronous. Under WSGI it runs on the thread that serves
the request; under ASGI Django runs it, and the sync views, in the request's
own thread, and the refusal of a sync view is answered the same way (Django
reads the whole body there before any middleware, so the ``413`` is for WSGI
servers). Async views are not covered.

Settings, all optional, in a ``ALLOCPOLICY_MIDDLEWARE`` dict: ``scope`` (default
``"request"``), ``status``, ``too_large_status``, ``max_body`` and ``logger``,
as for :class:`~allocpolicy.integrations.wsgi.AllocPolicyMiddleware`.

Your own handling wins: a middleware listed after this one sees the exception
first (Django calls ``process_exception`` from the innermost middleware out);
:func:`refusal` tells it whether the exception is a refusal, and
:func:`refusal_facts` gives the facts. ``handler500`` views read the refusal of
the request with :func:`refusal` too (a streamed response's body, iterated by
the server after the middleware returned, runs in the instance as well).
"""

from __future__ import annotations

import sys
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import got_request_exception
from django.http import HttpRequest, HttpResponse

import allocpolicy
from allocpolicy._core.refusal import Watch

from ._http import RequestGuard, find_refusal, refusal_facts

__all__ = ["AllocPolicyMiddleware", "refusal", "refusal_facts", "SETTING"]

#: The name of the optional settings dict.
SETTING = "ALLOCPOLICY_MIDDLEWARE"
_OPTIONS = ("scope", "status", "too_large_status", "max_body", "logger")
# The request's state, on the request object (one per request, no lookup table).
_STATE = "_allocpolicy_state"
_END = object()


class _State:
    """What the middleware knows of one request."""

    __slots__ = ("watch", "error", "answered")

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.error: allocpolicy.AllocError | None = None
        self.answered = False

    def note(self, exc: BaseException | None) -> allocpolicy.AllocError | None:
        # The conversion reports each refusal once; later calls (another
        # middleware's process_exception, then ours) get the one it made.
        if self.error is None:
            self.error = find_refusal(exc) or self.watch.convert(exc)
        return self.error


def refusal(request: HttpRequest, exception: BaseException | None = None) -> allocpolicy.AllocError | None:
    """The refusal of ``request``: the :class:`~allocpolicy.AllocError` that
    ``exception`` (as a ``process_exception`` receives it) carries, or, without
    it, the refusal already seen in this request; ``None`` when there is none
    or when the request did not pass through :class:`AllocPolicyMiddleware`.

    Call it on the thread that ran the failed code (Django's own, under WSGI).
    """
    state: _State | None = getattr(request, _STATE, None)
    if state is None:
        return find_refusal(exception)
    return state.note(exception) if exception is not None else state.error


def _options() -> dict[str, Any]:
    given = getattr(settings, SETTING, {})
    if not isinstance(given, dict):
        raise ImproperlyConfigured(f"settings.{SETTING} must be a dict, not {type(given).__name__}")
    unknown = sorted(set(given) - set(_OPTIONS))
    if unknown:
        raise ImproperlyConfigured(
            f"settings.{SETTING}: unknown key {unknown[0]!r} (known: {', '.join(_OPTIONS)})"
        )
    return dict(given)


class AllocPolicyMiddleware:
    """The Django middleware: each request in a new instance of the scope
    ``settings.ALLOCPOLICY_MIDDLEWARE["scope"]`` (default ``"request"``), a
    refusal answered with ``status`` (default 507) and its facts."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        options = _options()
        try:
            self.guard = RequestGuard(**options)
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"settings.{SETTING}: {exc}") from None

    def __call__(self, request: HttpRequest) -> HttpResponse:
        guard = self.guard
        length = request.META.get("CONTENT_LENGTH")
        limit = guard.too_large(length) if length else None
        if limit is not None:
            # Answered before request.body or request.POST is touched: the
            # body is never read.
            body = guard.rejected(length, limit, request.method or "", request.path)
            # No "Connection: close" header: a hop-by-hop header is the
            # server's (wsgiref, behind runserver, refuses it from an app).
            return HttpResponse(body, status=guard.too_large_status, content_type="application/json")
        try:
            with allocpolicy.task(guard.scope):
                state = _State(Watch(guard.scope))
                setattr(request, _STATE, state)
                response = self.get_response(request)
                if state.error is not None and not state.answered and response.status_code == 500:
                    # Another middleware's code was refused: Django made its 500
                    # page (got_request_exception told us why); answer the 507.
                    return self._answer(state, state.error, request)
                if response.streaming and not getattr(response, "is_async", False):
                    # The server iterates the body after this returns: the
                    # iteration runs in this request's instance too.
                    response.streaming_content = self._scoped(response.streaming_content, request)
                return response
        except allocpolicy.AllocError as err:
            # This middleware's own code, or the 500 page Django built.
            state = getattr(request, _STATE, None) or _State(Watch(guard.scope))
            return self._answer(state, err, request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """Answer a view refused memory (Django calls this for a view's
        exception, and for one from rendering its ``TemplateResponse``)."""
        state: _State | None = getattr(request, _STATE, None)
        if state is None:
            return None
        err = state.note(exception)
        return self._answer(state, err, request) if err is not None else None

    def _answer(self, state: _State, err: allocpolicy.AllocError, request: HttpRequest) -> HttpResponse:
        state.error = err
        state.answered = True
        body = self.guard.refused(err, request.method or "", request.path)
        return HttpResponse(body, status=self.guard.status, content_type="application/json")

    def _scoped(self, content, request: HttpRequest):
        step = allocpolicy.bind(_stepper(iter(content)))

        def chunks():
            nonlocal step
            try:
                while True:
                    try:
                        chunk = step()
                    except allocpolicy.AllocError as err:
                        # The status went out with the headers: the server
                        # closes the connection.
                        self.guard.refused_late(err, request.method or "", request.path)
                        raise
                    if chunk is _END:
                        return
                    yield chunk
            finally:
                # Dropping the bound stepper releases the request's instance.
                step = None

        return chunks()


def _stepper(it):
    def step():
        return next(it, _END)

    return step


def _on_exception(sender, request=None, **kwargs) -> None:
    """``got_request_exception``: Django is about to build its 500 page for
    an exception no ``process_exception`` answered, on the thread that raised
    it; note whether it is a refusal, for the middleware and ``handler500``."""
    state: _State | None = getattr(request, _STATE, None)
    if state is not None:
        state.note(sys.exc_info()[1])


got_request_exception.connect(_on_exception, dispatch_uid="allocpolicy.integrations.django")

"""Flask: each request in its own scope instance, and a refusal answered 507
even though Flask catches every exception a view raises::

    from allocpolicy.integrations.flask import AllocPolicy

    app = Flask(__name__)
    AllocPolicy(app)                      # or AllocPolicy().init_app(app)

Flask turns an exception it has no handler for into a plain ``500 Internal
Server Error`` before any WSGI middleware could see it. :class:`AllocPolicy`
therefore does three things:

- wraps ``app.wsgi_app`` in :class:`~allocpolicy.integrations.wsgi.AllocPolicyMiddleware`
  (the request's scope instance, the ``Content-Length`` check, the response
  body iterated in the instance);
- runs each view, ``before_request``/``after_request`` function and error
  handler so that a refused allocation in it raises
  :class:`allocpolicy.AllocError` (a task boundary in the request's instance)
  instead of a bare ``MemoryError``;
- registers an error handler for ``AllocError`` that answers ``507`` with the
  refusal's facts, and one for ``500`` that does so when the 500 came from a
  refusal (raised in an error handler or an ``after_request`` function).

Your own handlers win: register ``@app.errorhandler(AllocError)`` after
``AllocPolicy(app)`` to answer differently, and read the facts with
:func:`refusal_facts`; in a handler for ``500`` or ``Exception``,
:func:`refusal` finds the refusal behind the error.
"""

from __future__ import annotations

from typing import Any

import flask
from werkzeug.exceptions import InternalServerError

import allocpolicy

from ._http import RequestGuard, find_refusal, refusal_facts
from .wsgi import AllocPolicyMiddleware

__all__ = ["AllocPolicy", "refusal", "refusal_facts"]

_G_KEY = "allocpolicy_refusal"


def refusal(error: BaseException | None = None) -> allocpolicy.AllocError | None:
    """The refusal behind ``error`` (an ``AllocError``, or an exception that wraps
    one, such as Flask's ``InternalServerError``), or, without an argument, the
    refusal answered in the current request; ``None`` when there is none."""
    if error is not None:
        return find_refusal(error)
    return flask.g.get(_G_KEY) if flask.has_app_context() else None


class AllocPolicy:
    """The Flask extension; the arguments after ``app`` (``scope``, and
    ``status``, ``too_large_status``, ``max_body``, ``logger`` by keyword) are
    those of :class:`~allocpolicy.integrations.wsgi.AllocPolicyMiddleware`."""

    def __init__(self, app: flask.Flask | None = None, scope: str = "request", **options: Any) -> None:
        self._options: dict[str, Any] = dict(options, scope=scope)
        # Built now so that a wrong argument is reported here, not at init_app.
        self.guard = RequestGuard(**self._options)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        if "allocpolicy" in app.extensions:
            raise RuntimeError(f"AllocPolicy is already set up on the Flask application {app.name!r}")
        app.wsgi_app = AllocPolicyMiddleware(app.wsgi_app, **self._options)  # type: ignore[method-assign]
        flask_ensure_sync = app.ensure_sync

        def ensure_sync(func):
            # Flask calls this for every view, request hook and error handler
            # it runs; bind() runs the function in the request's instance
            # (entered by the middleware) as a task boundary, so a refusal
            # leaves it as AllocError and reaches the handler below.
            return allocpolicy.bind(flask_ensure_sync(func))

        app.ensure_sync = ensure_sync  # type: ignore[method-assign]
        app.register_error_handler(allocpolicy.AllocError, self._answer)
        app.register_error_handler(InternalServerError, self._answer_server_error)
        app.extensions["allocpolicy"] = self

    def _answer(self, err: allocpolicy.AllocError) -> flask.Response:
        flask.g.setdefault(_G_KEY, err)
        body = self.guard.refused(err, flask.request.method, flask.request.path)
        return flask.Response(body, status=self.guard.status, mimetype="application/json")

    def _answer_server_error(self, error: InternalServerError):
        err = find_refusal(error)
        return self._answer(err) if err is not None else error

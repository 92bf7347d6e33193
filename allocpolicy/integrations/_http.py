"""What the WSGI and ASGI middleware share: the refusal's facts as a response,
the request body limit, and the log line.

Nothing here knows a server or a framework; the middleware modules speak
their protocol and ask this module what to answer.
"""

from __future__ import annotations

import http
import json
import logging
import traceback
from typing import Any

import allocpolicy

__all__ = ["RequestGuard", "refusal_facts", "find_refusal", "LOGGER_NAME"]

#: The logger every integration writes its refusals to.
LOGGER_NAME = "allocpolicy.integrations"

#: ``max_body`` default: a body larger than the scope's budget cannot be held
#: by a request that must live within that budget.
BUDGET = "budget"


def refusal_facts(err: allocpolicy.AllocError) -> dict[str, Any]:
    """The facts of a refusal as a JSON-ready mapping: what the 507 body holds.

    Keys: ``error`` (the message), ``scope``, ``task``, ``size``, ``budget``,
    ``live``, ``reason`` and ``limit``, as the attributes of
    :class:`allocpolicy.AllocError`.
    """
    if not isinstance(err, allocpolicy.AllocError):
        raise TypeError(f"refusal_facts(): argument 'err' must be an AllocError, not {type(err).__name__}")
    return {
        "error": str(err),
        "scope": err.scope,
        "task": err.task,
        "size": err.size,
        "budget": err.budget,
        "live": err.live,
        "reason": err.reason,
        "limit": err.limit,
    }


def find_refusal(exc: BaseException | None) -> allocpolicy.AllocError | None:
    """The :class:`allocpolicy.AllocError` that ``exc`` is, wraps or was raised
    from, or ``None``.

    Frameworks wrap an unhandled exception before their error handlers see it
    (Flask's ``InternalServerError.original_exception``, ``__cause__``,
    ``__context__``); this follows those links.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, allocpolicy.AllocError):
            return exc
        seen.add(id(exc))
        exc = (
            getattr(exc, "original_exception", None)
            or exc.__cause__
            or (None if exc.__suppress_context__ else exc.__context__)
        )
    return None


def _status_line(code: int) -> str:
    try:
        return f"{code} {http.HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def _check_status(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"argument {name!r} must be an int HTTP status, not {type(value).__name__}")
    if not 400 <= value <= 599:
        raise ValueError(f"argument {name!r} must be an HTTP error status (400-599), got {value}")
    return value


class RequestGuard:
    """The settings of a request middleware and the answers it gives.

    Args:
        scope: the scope each request runs in (one instance per request).
        status: the status of a response to a refused request.
        too_large_status: the status of a response to a request whose
            ``Content-Length`` is over ``max_body``.
        max_body: the largest ``Content-Length`` accepted: ``"budget"`` (the
            scope's per-instance budget, read from the active policy at each
            request), a number of bytes, or ``None`` for no limit.
        logger: where refusals are logged (default: ``allocpolicy.integrations``).
    """

    def __init__(
        self,
        scope: str = "request",
        *,
        status: int = 507,
        too_large_status: int = 413,
        max_body: int | str | None = BUDGET,
        logger: logging.Logger | None = None,
    ) -> None:
        if not isinstance(scope, str):
            raise TypeError(f"argument 'scope' must be str, not {type(scope).__name__}")
        if not scope:
            raise ValueError("argument 'scope' must not be empty")
        if max_body is not None and max_body != BUDGET:
            if isinstance(max_body, bool) or not isinstance(max_body, int):
                raise TypeError(
                    f"argument 'max_body' must be an int, 'budget' or None, not {type(max_body).__name__}"
                )
            if max_body < 0:
                raise ValueError(f"argument 'max_body' must not be negative, got {max_body}")
        self.scope = scope
        self.status = _check_status(status, "status")
        self.too_large_status = _check_status(too_large_status, "too_large_status")
        self.max_body = max_body
        self.logger = logger if logger is not None else logging.getLogger(LOGGER_NAME)
        self.status_line = _status_line(self.status)
        self.too_large_line = _status_line(self.too_large_status)

    def body_limit(self) -> int | None:
        """The ``Content-Length`` above which a request is refused up front."""
        if self.max_body != BUDGET:
            return self.max_body  # type: ignore[return-value]
        scope = allocpolicy.active_policy().scopes.get(self.scope)
        return scope.budget if scope is not None else None

    def too_large(self, content_length: str | bytes | None) -> int | None:
        """The limit that a declared ``Content-Length`` is over, else ``None``.
        A missing or malformed length is left to the server and the application."""
        if content_length is None:
            return None
        try:
            length = int(content_length)
        except ValueError:
            return None
        limit = self.body_limit()
        return limit if limit is not None and length > limit else None

    def refused(self, err: allocpolicy.AllocError, method: str, path: str) -> bytes:
        """Log a refused request and return the body of its response."""
        self.logger.warning(
            "%s %s refused with %d: %s", method, path, self.status, err,
            extra={"allocpolicy": refusal_facts(err)},
        )
        _release(err)
        return _json(refusal_facts(err))

    def refused_late(self, err: allocpolicy.AllocError, method: str, path: str) -> None:
        """Log a refusal that came after the response had started: the
        connection is closed instead of answered."""
        self.logger.warning(
            "%s %s refused after its response started; closing the connection: %s", method, path, err,
            extra={"allocpolicy": refusal_facts(err)},
        )
        _release(err)


    def rejected(self, length: str | bytes, limit: int, method: str, path: str) -> bytes:
        """Log a request refused for its ``Content-Length`` and return the body."""
        length_text = length.decode("latin-1") if isinstance(length, bytes) else length
        self.logger.warning(
            "%s %s refused with %d: Content-Length %s is over the limit of %d bytes",
            method, path, self.too_large_status, length_text, limit,
        )
        return _json(
            {
                "error": f"request body of {length_text} bytes is over the limit of {limit} bytes",
                "scope": self.scope,
                "size": int(length_text),
                "budget": limit,
            }
        )


def _json(facts: dict[str, Any]) -> bytes:
    return json.dumps(facts).encode() + b"\n"


def _release(err: BaseException) -> None:
    """Clear the locals of the failed request's frames, once logged.

    Frameworks keep the exception in locals of frames that its own traceback
    holds (``except Exception as exc: ... raise exc``), a cycle that only the
    cyclic garbage collector breaks, some time later; until then the frames
    keep what the request built, the very memory it was refused more of.
    Clearing them frees it now (frames still running are left alone)."""
    traceback.clear_frames(err.__traceback__)

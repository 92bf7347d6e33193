"""Deterministic fault injection: fail chosen allocations, and say how to fail them again.

While an injection setting is in force, the runtime numbers the allocations
that match its filters (a scope, allocator domains, a size range) 1, 2, 3, ...
in the order they reach it, and fails those its triggers pick::

    nth=17              the 17th
    start=10,stop=20    the 10th to the 19th
    every=100           the 100th, the 200th, ...
    probability=0.01    each with probability 1/100, decided by a hash of
                        (seed, index): the same seed fails the same indices
    persistent          after the first injected failure, every later one too

An injected failure follows the mode of the scope it happens in, like a budget
refusal: in a ``raise`` scope the allocation returns ``NULL`` and a task
boundary raises :class:`~allocpolicy.AllocError` with ``reason="injected"``
and the ``index`` that reproduces it.

The same keys are accepted by :func:`inject`, by the ``ALLOCPOLICY_INJECT``
environment variable (``"scope=task,nth=17"``, applied when the package
activates in a process started by ``allocpolicy run``) and by the ``[inject]``
table of a policy file. This module imports nothing heavy: it runs at startup
when ``ALLOCPOLICY_INJECT`` is set.
"""

from __future__ import annotations

import os

from . import _atfork, _native
from ._core.names import warn_inactive
from ._errors import AllocError, AllocPolicyWarning
from ._inject_settings import ENV_INJECT, KEYS, InjectSettings

__all__ = ["ENV_INJECT", "InjectSettings", "InjectStats", "inject", "inject_stats", "replay_setting"]

# --- applying it -----------------------------------------------------------------


class InjectStats:
    """Counters of the injection in force (:func:`inject_stats`).

    Attributes:
        active: whether an injection setting is in force.
        seen: matching allocations numbered so far (the last index given).
        injected: failures injected.
        first_index: index of the first injected failure (0: none yet).
        last_index: index of the latest injected failure (0: none yet).
        settings: the setting in force, as far as this process set it
            (``None`` when injection is off).
    """

    __slots__ = ("active", "seen", "injected", "first_index", "last_index", "settings")

    def __init__(self, active, seen, injected, first_index, last_index, settings) -> None:
        self.active = active
        self.seen = seen
        self.injected = injected
        self.first_index = first_index
        self.last_index = last_index
        self.settings = settings

    def __repr__(self) -> str:
        return (
            f"InjectStats(active={self.active}, seen={self.seen}, injected={self.injected}, "
            f"first_index={self.first_index}, last_index={self.last_index}, "
            f"settings={self.settings!r})"
        )


# The runtime keeps one setting for the process. Python keeps what it last
# applied, so that a `with inject(...)` block can put back what was there.
_lock = _atfork.lock()
_STARTUP = object()  # whatever the policy handed over by `allocpolicy run` holds
_current: object = _STARTUP
_last: InjectSettings | None = None  # the newest setting that was not "off"


def _resolve(value: object) -> InjectSettings | None:
    if value is _STARTUP:
        rt = _native.runtime()
        if rt is None or not rt.inject_stats().active:
            return None
        # Only now: _config (and the policy model it loads) is not
        # imported at startup, where this module may be.
        from ._config import active_policy

        return getattr(active_policy(), "inject", None)
    return value  # type: ignore[return-value]


def _apply(rt: _native.Runtime, settings: InjectSettings | None) -> None:
    """Put ``settings`` in force (counters start over). Caller holds _lock."""
    global _current, _last
    rt.inject_set(settings._struct(rt) if settings is not None else None)
    _current = settings
    if settings is not None:
        _last = settings


def current() -> InjectSettings | None:
    """The setting in force, as far as this process knows it."""
    with _lock:
        return _resolve(_current)


def reapply(rt: _native.Runtime, settings: InjectSettings | None) -> None:
    """Put ``settings`` (from :func:`current`) back in force after the
    runtime's setting was changed directly, as the pytest plugin does."""
    with _lock:
        _apply(rt, settings)


def applied(settings: InjectSettings | None) -> None:
    """Record that ``settings`` reached the runtime another way (a policy table)."""
    global _current, _last
    with _lock:
        _current = settings
        if settings is not None:
            _last = settings


class inject:
    """Put a fault-injection setting in force; a context manager that restores the previous one.

    ``allocpolicy.inject(nth=17, scope="task")`` applies at once, and the
    allocations of the ``task`` scope are numbered from 1 again; used as
    ``with allocpolicy.inject(...):``, the setting in force before it is
    applied again when the block ends (its counters start over too). The
    arguments are those of :class:`InjectSettings`; a ready
    :class:`InjectSettings` (or its string form) can be passed instead.

    Without a preloaded runtime nothing is injected and an
    :class:`AllocPolicyWarning` is issued once.

    Raises:
        ValueError, TypeError: an argument is wrong (the message names it).
        UnknownScopeError: ``scope`` is not declared in the active policy.
    """

    def __init__(self, settings: InjectSettings | str | None = None, /, **kwargs) -> None:
        if settings is not None:
            if kwargs:
                raise TypeError("inject(): pass either a setting or keyword arguments, not both")
            if isinstance(settings, str):
                try:
                    settings = InjectSettings.from_string(settings)
                except ValueError as exc:
                    raise ValueError(f"inject(): argument 'settings': {exc}") from None
            elif not isinstance(settings, InjectSettings):
                raise TypeError(
                    "inject(): argument 'settings' must be an InjectSettings or a string, "
                    f"not {type(settings).__name__}"
                )
        else:
            unknown = sorted(set(kwargs) - set(KEYS))
            if unknown:
                raise TypeError(f"inject(): unexpected keyword argument {unknown[0]!r}")
            settings = InjectSettings(**kwargs)
        self.settings: InjectSettings | None = settings
        self._start()

    @classmethod
    def off(cls) -> "inject":
        """Turn injection off (as a context manager: for the block only)."""
        self = cls.__new__(cls)
        self.settings = None
        self._start()
        return self

    def _start(self) -> None:
        rt = _native.runtime()
        self._rt = rt
        self._restored = False
        if rt is None:
            warn_inactive()
            self._previous = None
            return
        with _lock:
            self._previous = _current
            _apply(rt, self.settings)

    def restore(self) -> None:
        """Put back the setting that was in force before this one (once)."""
        if self._restored or self._rt is None:
            return
        self._restored = True
        with _lock:
            _apply(self._rt, _resolve(self._previous))

    def stats(self) -> InjectStats:
        """The counters: how many allocations were numbered and which failed."""
        return inject_stats()

    def replay(self, failure: AllocError | int | None = None) -> str:
        """The ``ALLOCPOLICY_INJECT`` value that fails the same allocation again.

        ``failure`` is an :class:`AllocError` with ``reason="injected"``, an
        index, or ``None`` for the first failure injected so far.
        """
        return replay_setting(failure, settings=self.settings)

    def __enter__(self) -> "inject":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.restore()
        return False

    def __repr__(self) -> str:
        return f"inject({str(self.settings) if self.settings else 'off'!r})"


def inject_stats() -> InjectStats:
    """Counters of the injection in force (all zero without a runtime)."""
    rt = _native.runtime()
    if rt is None:
        return InjectStats(False, 0, 0, 0, 0, None)
    s = rt.inject_stats()
    with _lock:
        current = _current
    return InjectStats(
        bool(s.active), s.seen, s.injected, s.first_index, s.last_index,
        _resolve(current) if s.active else None,
    )


def replay_setting(
    failure: AllocError | int | None = None, *, settings: InjectSettings | str | None = None
) -> str:
    """The one setting that reproduces an injected failure, as ``ALLOCPOLICY_INJECT`` takes it.

    ``failure`` is the :class:`AllocError` (``reason="injected"``) or the
    index; ``None`` means the first failure injected under the setting in force.
    The setting keeps the filters of ``settings`` (default: the newest setting
    applied in this process) and replaces its triggers by ``nth=INDEX``::

        >>> replay_setting(err)                       # doctest: +SKIP
        'scope=task,nth=17'

    To replay a whole probability run instead, reuse its setting, which
    carries its seed (``str(settings)``).

    Raises:
        ValueError: the error was not injected, or there is nothing to replay.
    """
    if isinstance(settings, str):
        settings = InjectSettings.from_string(settings)
    if settings is None:
        with _lock:
            settings = _resolve(_current) or _last
    if isinstance(failure, AllocError):
        if failure.reason != "injected" or failure.index is None:
            raise ValueError(
                f"replay_setting(): argument 'failure': the allocation was refused for "
                f"reason {failure.reason!r}, not injected"
            )
        index = failure.index
    elif failure is None:
        index = inject_stats().first_index
        if not index:
            raise ValueError("replay_setting(): no failure has been injected yet")
    elif isinstance(failure, int) and not isinstance(failure, bool):
        index = failure
    else:
        raise TypeError(
            "replay_setting(): argument 'failure' must be an AllocError or an index, "
            f"not {type(failure).__name__}"
        )
    base = settings if settings is not None else InjectSettings()
    try:
        return base.replay(index).to_string()
    except ValueError as exc:
        raise ValueError(f"replay_setting(): argument 'failure': {exc}") from None


def activate_from_environment(rt: _native.Runtime) -> None:
    """Apply ``ALLOCPOLICY_INJECT`` at startup; a mistake is a warning, not a crash."""
    import warnings

    text = os.environ.get(ENV_INJECT, "")
    try:
        settings = InjectSettings.from_string(text)
        with _lock:
            _apply(rt, settings)
    except (ValueError, LookupError) as exc:
        warnings.warn(
            f"{ENV_INJECT}={text!r} was ignored, nothing is injected: {exc}",
            AllocPolicyWarning,
            stacklevel=3,
        )
        return
    if settings.probability is not None and "seed" not in text:
        # The seed was drawn at random: without it this run cannot be replayed.
        fd = rt.process_stats().report_fd
        line = f"allocpolicy: {ENV_INJECT}={settings.to_string()} (seed drawn for this run)\n"
        try:
            os.write(fd, line.encode())
        except OSError:
            pass

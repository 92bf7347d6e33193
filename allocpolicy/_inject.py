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
from ._errors import AllocError, AllocPolicyWarning

__all__ = ["ENV_INJECT", "InjectSettings", "InjectStats", "inject", "inject_stats", "replay_setting"]

#: Environment variable holding an injection setting for processes started by
#: ``allocpolicy run`` (same keys as :func:`inject`).
ENV_INJECT = "ALLOCPOLICY_INJECT"

# Indices and seeds stay below 2**62: the compiled table's numbers are
# int64 (native/src/policy.c), and no run makes that many allocations.
_LIMIT = 1 << 62
# Probabilities are fixed point out of 2**32 in the runtime (allocpolicy.h).
_P_ONE = 1 << 32
# Keys in the order they are written back (to_string), so that a setting and
# its printed form always look the same.
_KEYS = (
    "scope", "nth", "start", "stop", "every", "probability", "seed",
    "min_size", "max_size", "domains", "persistent",
)
_DOMAIN_NAMES = _native.DOMAINS


# --- validators ------------------------------------------------------------------
#
# One per key, shared by inject(), ALLOCPOLICY_INJECT and the policy's [inject]
# table: each returns the normalized value or raises ValueError saying what was
# expected (callers add where the value came from).


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return f"{type(value).__name__} ({value!r:.40})"


def _index(value: object) -> int:
    """An allocation index: a whole number >= 1."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an allocation index (a whole number >= 1), got {_kind(value)}")
    if not 1 <= value < _LIMIT:
        raise ValueError(f"expected an allocation index from 1 to 2**62 - 1, got {value}")
    return value


def _probability(value: object) -> float:
    """A probability: a number in (0, 1], or a string such as "0.5%"."""
    text = value.strip() if isinstance(value, str) else None
    if text is not None:
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ValueError(
                f"expected a probability such as 0.01 or '1%', got {_kind(text)}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a probability such as 0.01 or '1%', got {_kind(value)}")
    if not 0 < value <= 1:
        raise ValueError(f"expected a probability greater than 0 and at most 1, got {value!r}")
    return float(value)


def _seed(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _LIMIT:
        raise ValueError(f"expected a seed, a whole number from 0 to 2**62 - 1, got {_kind(value)}")
    return value


def _size(value: object) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    from ._sizes import parse_size  # only for sizes with a unit

    return parse_size(value)  # type: ignore[return-value]


def _scope(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a scope name, got {_kind(value)}")
    if len(value) > _native.SCOPE_NAME_MAX - 1 or not all(c.isalnum() or c in "_.-" for c in value):
        raise ValueError(f"invalid scope name {value!r}")
    return value


def _domains(value: object) -> tuple[str, ...]:
    """Domain names: a list, or a string with names joined by '+'."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split("+")]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"expected a list of allocator domains ({', '.join(_DOMAIN_NAMES)}), got {_kind(value)}"
        )
    names = []
    for name in value:
        if name not in _DOMAIN_NAMES:
            raise ValueError(
                f"unknown allocator domain {name!r}; expected some of {', '.join(_DOMAIN_NAMES)}"
            )
        if name not in names:
            names.append(name)
    # Canonical order, so equal settings compare and print equal.
    return tuple(sorted(names, key=_DOMAIN_NAMES.index))


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", ""):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {_kind(value)}")


#: key -> validator; ``None`` is "not set" for every key.
VALIDATORS = {
    "scope": _scope,
    "nth": _index,
    "start": _index,
    "stop": _index,
    "every": _index,
    "probability": _probability,
    "seed": _seed,
    "min_size": _size,
    "max_size": _size,
    "domains": _domains,
    "persistent": _flag,
}


def check_combination(values: dict) -> tuple[str, str] | None:
    """The first mistake between keys, as (key, message), or None."""
    start, stop = values.get("start"), values.get("stop")
    if start is not None and stop is not None and stop <= start:
        return "stop", f"the window [start, stop) is empty: stop ({stop}) must be greater than start ({start})"
    lo, hi = values.get("min_size"), values.get("max_size")
    if lo is not None and hi is not None and hi < lo:
        return "max_size", f"max_size ({hi}) is smaller than min_size ({lo})"
    if values.get("seed") is not None and values.get("probability") is None:
        return "seed", "a seed only matters with a probability; add probability=..."
    return None


# --- the setting -----------------------------------------------------------------


class InjectSettings:
    """One fault-injection setting; immutable and hashable.

    Every argument is optional; ``None`` means "not set". With no trigger
    (``nth``, ``start``/``stop``, ``every``, ``probability``) nothing fails and
    the runtime only numbers the matching allocations, which tells how many
    there are (:attr:`InjectStats.seen`).

    Arguments:
        scope: only allocations made while an instance of this scope is on the
            thread's scope stack (``"process"``: all of them; ``None``: all).
        nth: fail the allocation with this index (1 for the first).
        start, stop: fail every index in ``[start, stop)``; either alone means
            from ``start`` on, or up to ``stop``.
        every: fail every index divisible by this.
        probability: fail each index with this probability (0 < p <= 1, or a
            string such as ``"1%"``), decided by a hash of ``(seed, index)``.
        seed: for ``probability``; ``None`` picks a random one, kept in the
            setting so that the run can be replayed.
        min_size, max_size: only requests of this many bytes or more / or less
            (sizes such as ``"4 KiB"`` are accepted).
        domains: only these allocator entry points: ``"libc"`` (the malloc
            family), ``"py_raw"``, ``"py_mem"``, ``"py_obj"`` (Python's
            allocator domains, seen in in-process mode), ``"numpy"``,
            ``"py_arena"``. Default: every domain but ``"py_arena"``.
        persistent: after the first injected failure, fail every later
            matching allocation too (SQLite's "persistent" memfault).
    """

    __slots__ = _KEYS

    def __init__(
        self,
        *,
        scope: str | None = None,
        nth: int | None = None,
        start: int | None = None,
        stop: int | None = None,
        every: int | None = None,
        probability: float | str | None = None,
        seed: int | None = None,
        min_size: int | str | None = None,
        max_size: int | str | None = None,
        domains: list[str] | tuple[str, ...] | str | None = None,
        persistent: bool = False,
    ) -> None:
        given = dict(
            scope=scope, nth=nth, start=start, stop=stop, every=every, probability=probability,
            seed=seed, min_size=min_size, max_size=max_size, domains=domains, persistent=persistent,
        )
        values = {}
        for key, value in given.items():
            if value is None:
                values[key] = None
                continue
            try:
                values[key] = VALIDATORS[key](value)
            except ValueError as exc:
                raise ValueError(f"inject(): argument {key!r}: {exc}") from None
        wrong = check_combination(values)
        if wrong:
            raise ValueError(f"inject(): argument {wrong[0]!r}: {wrong[1]}")
        if values["probability"] is not None and values["seed"] is None:
            # A random seed, but a known one: the setting (and so its printed
            # form) carries it, which is what makes the run replayable.
            values["seed"] = int.from_bytes(os.urandom(4), "little")
        values["persistent"] = bool(values["persistent"])
        for key in _KEYS:
            object.__setattr__(self, key, values[key])

    @classmethod
    def from_string(cls, text: str) -> "InjectSettings":
        """Parse the ``ALLOCPOLICY_INJECT`` form: ``"scope=task,nth=17"``.

        Keys are those of the constructor, separated by commas; domains are
        joined by ``+`` (``domains=libc+py_mem``); ``persistent`` may stand
        alone.

        Raises:
            ValueError: naming the key that is wrong.
        """
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        kwargs: dict = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            if key not in VALIDATORS:
                raise ValueError(f"unknown key {key!r}; expected some of {', '.join(_KEYS)}")
            if key in kwargs:
                raise ValueError(f"key {key!r} is given twice")
            if not eq and key != "persistent":
                raise ValueError(f"key {key!r} needs a value ({key}=...)")
            kwargs[key] = value.strip() if eq else True
        try:
            return cls(**kwargs)
        except ValueError as exc:
            raise ValueError(str(exc).replace("inject(): argument ", "key ", 1)) from None

    def to_string(self) -> str:
        """The ``ALLOCPOLICY_INJECT`` form, which :meth:`from_string` reads back."""
        parts = []
        for key in _KEYS:
            value = getattr(self, key)
            if value is None or value is False:
                continue
            if key == "domains":
                parts.append(f"domains={'+'.join(value)}")
            elif key == "persistent":
                parts.append("persistent")
            else:
                parts.append(f"{key}={value!r}" if key == "probability" else f"{key}={value}")
        return ",".join(parts)

    __str__ = to_string

    def __repr__(self) -> str:
        return f"InjectSettings({self.to_string()!r})"

    def _fields(self) -> tuple:
        return tuple(getattr(self, key) for key in _KEYS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InjectSettings):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __setattr__(self, name, value):
        raise AttributeError(f"InjectSettings is immutable; cannot set {name!r}")

    def __reduce__(self):
        return _rebuild, (self.to_string(),)

    @property
    def fails_anything(self) -> bool:
        """True if some trigger is set (else the setting only numbers allocations)."""
        return any(
            getattr(self, key) is not None for key in ("nth", "start", "stop", "every", "probability")
        )

    def replay(self, index: int) -> "InjectSettings":
        """The setting that fails exactly allocation ``index`` of this one's
        numbering: the same filters (scope, domains, sizes), ``nth=index``."""
        return InjectSettings(
            scope=self.scope, nth=_index(index), min_size=self.min_size,
            max_size=self.max_size, domains=self.domains,
        )

    def to_table(self) -> str:
        """The ``inject=`` entry of the compiled policy table (native/src/policy.c)."""
        parts = []
        if self.scope is not None:
            parts.append(f"scope={self.scope}")
        for key, name in (("nth", "nth"), ("every", "every"), ("min_size", "min"), ("max_size", "max")):
            value = getattr(self, key)
            if value:
                parts.append(f"{name}={value}")
        start, stop = self._window()
        if stop:
            parts += [f"start={start}", f"stop={stop}"]
        if self.probability is not None:
            parts += [f"p={_fixed(self.probability)}", f"seed={self.seed}"]
        if self.domains:
            parts.append(f"domains={_mask(self.domains)}")
        if self.persistent:
            parts.append("persist=1")
        # No trigger at all still needs one field for the grammar; nth=0 is "off".
        return "inject=" + (",".join(parts) or "nth=0")

    def _window(self) -> tuple[int, int]:
        if self.start is None and self.stop is None:
            return 0, 0
        # The runtime's window is [start, stop) with stop == 0 meaning "no
        # window"; an open end is the largest index instead.
        return (self.start or 1), (self.stop or _LIMIT)

    def _struct(self, rt: _native.Runtime) -> _native.InjectConfigC:
        c = _native.InjectConfigC()
        c.flags = _native.INJECT_PERSISTENT if self.persistent else 0
        c.nth = self.nth or 0
        c.start, c.stop = self._window()
        c.every = self.every or 0
        c.probability = _fixed(self.probability) if self.probability is not None else 0
        c.seed = self.seed or 0
        c.min_size = self.min_size or 0
        c.max_size = self.max_size or 0
        c.scope = _scope_id(rt, self.scope)
        c.domains = _mask(self.domains) if self.domains else 0
        return c


def _rebuild(text: str) -> InjectSettings:
    return InjectSettings.from_string(text)


def _fixed(p: float) -> int:
    return min(_P_ONE, max(1, round(p * _P_ONE)))


def _mask(domains: tuple[str, ...]) -> int:
    mask = 0
    for name in domains:
        mask |= 1 << _DOMAIN_NAMES.index(name)
    return mask


def _scope_id(rt: _native.Runtime, name: str | None) -> int:
    if name is None:
        return _native.INJECT_ANY_SCOPE
    if name == "process":
        return 0
    from . import _config

    return _config.scope_id(rt, name)


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
            unknown = sorted(set(kwargs) - set(_KEYS))
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
            from ._config import warn_inactive

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

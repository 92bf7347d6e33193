"""One fault-injection setting: its keys, their validators, and its written forms.

:class:`InjectSettings` is what :func:`allocpolicy.inject`, the
``ALLOCPOLICY_INJECT`` environment variable and a policy's ``[inject]`` table
all describe (see ``_inject`` for how a setting is put in force). It is part of
the policy model: the validators here check the ``[inject]`` table too. This
module imports nothing heavy: it runs at startup when ``ALLOCPOLICY_INJECT``
is set.
"""

from __future__ import annotations

import os

from . import _native
from ._core.names import scope_id

__all__ = ["ENV_INJECT", "KEYS", "VALIDATORS", "InjectSettings", "check_combination"]

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
KEYS = (
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

    __slots__ = KEYS

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
        for key in KEYS:
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
                raise ValueError(f"unknown key {key!r}; expected some of {', '.join(KEYS)}")
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
        for key in KEYS:
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
        return tuple(getattr(self, key) for key in KEYS)

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
    return scope_id(rt, name)

"""Scopes bound to Python modules: ``modules = ["PIL.*"]`` in a ``[scopes.NAME]`` table.

While code of a matching module runs, and everything that code calls, the
thread's allocations are governed by that scope, as if the call had been
wrapped in ``with allocpolicy.scope(NAME)``. Only the outermost entry from code
that is not bound to the scope enters a new instance: recursion and calls from
one bound function to another stay in that instance. When a ``MemoryError``
caused by a refused allocation leaves the outermost bound frame of a scope
whose ``on_oom`` is ``"raise"``, it leaves as :class:`AllocError`, as at a task
boundary.

Two mechanisms, chosen by the Python version (docs/binding.rst compares them):

Python 3.12 and later: ``sys.monitoring``
    A tool of our own gets PY_START/PY_RESUME/PY_THROW when a frame starts or
    resumes, and PY_RETURN/PY_YIELD/PY_UNWIND when it returns, suspends or
    unwinds. The first event for a code object decides whether it belongs to a
    bound module (by the ``__name__`` of its globals); code that does not
    returns ``DISABLE``, so CPython stops calling us for it and unbound code
    pays nothing after its first call. PY_THROW and PY_UNWIND cannot be
    disabled; they cost a callback where a generator is thrown into or an
    exception leaves a frame. The callbacks are the runtime library's own C
    functions (native/src/pymonitor.c), which keep each thread's activations
    and call back into this module only to classify a code object seen first,
    to report an entry the runtime refused and to judge an exception leaving
    a frame that entered an instance.

Python 3.11: wrapping functions
    3.11 has no ``sys.monitoring``. ``sys.setprofile`` would call a Python
    function on every call and return of every function of the program, bound
    or not: about 580 ns on each call of a 60 ns function in our measurement,
    for all code, and it cannot replace the exception that unwinds. So the
    functions and methods defined in a bound module are replaced, in the
    module's and its classes' namespaces, by wrappers that enter and leave the
    scope; modules imported later are wrapped right after they execute, by a
    finder at the front of ``sys.meta_path``. Only bound code pays (about
    160 ns per call). References taken before the wrapping (decorator
    registries, ``from m import f`` done earlier) keep the unwrapped function.

Each thread keeps a stack of the activations of bound code it is in (on
3.12+ in the library, on 3.11 here). An entry
that starts a scope's outermost activation entered an instance; the matching
end leaves it. Activations on one thread are strictly nested (a generator that
yields ends its activation, its resumption starts a new one), so the end event
of a code object pops its own entry without consulting the bindings, and
bindings can be replaced while bound code runs in other threads.
"""

from __future__ import annotations

import _thread
import functools
import sys
import warnings
from types import FunctionType, ModuleType

from . import _atfork, _native
from ._core import refusal, stepping
from ._core.names import scope_id
from ._errors import AllocError, AllocPolicyError, AllocPolicyWarning

__all__ = ["apply", "activate_from_environment", "bound_scope"]

# Code flags (the values of inspect.CO_*; inspect itself is a heavy import).
_CO_OPTIMIZED = 0x0001
_CO_GENERATOR = 0x0020
_CO_COROUTINE = 0x0080
_CO_ASYNC_GENERATOR = 0x0200

# sys.monitoring tool ids without an assigned meaning (0 debugger, 1 coverage,
# 2 profiler, 5 optimizer), so that we coexist with the tools that use those.
_TOOL_IDS = (4, 3)
_TOOL_NAME = "allocpolicy"

_MONITORING = sys.version_info >= (3, 12)

# Marks our 3.11 wrappers: never wrap twice.
_MARK = "__allocpolicy_module__"


class _Binding:
    """A scope that code of some modules runs in."""

    __slots__ = ("name", "sid", "convert")

    def __init__(self, name: str, sid: int, convert: bool) -> None:
        self.name = name
        self.sid = sid
        # Only a raise-mode scope turns a refused allocation into MemoryError
        # in the first place; it converts it like a task boundary would.
        self.convert = convert


# --- Matching module names ---------------------------------------------------
#
# Patterns are validated by _policy: dotted names whose segments may be "*",
# a "*" matching exactly one segment except as the last segment, where it
# matches one or more.

_patterns: list[tuple[list[str], bool, _Binding]] = []
_cache: dict[str, _Binding | None] = {}
_firsts: frozenset[str] | None = frozenset()  # first segments of every pattern, None if one is "*"


def _lookup(module: str) -> _Binding | None:
    """The binding of a module name (uncached)."""
    if module == "allocpolicy" or module.startswith("allocpolicy."):
        return None
    parts = module.split(".")
    for segments, open_ended, binding in _patterns:
        if len(parts) < len(segments) or (not open_ended and len(parts) != len(segments)):
            continue
        if all(p == "*" or p == n for p, n in zip(segments, parts)):
            return binding
    return None


def bound_scope(module: str) -> str | None:
    """Name of the scope the module ``module`` is bound to, if any."""
    binding = _match(module)
    return binding.name if binding else None


def _match(module: str) -> _Binding | None:
    try:
        return _cache[module]
    except KeyError:
        pass
    if _firsts is not None and module.partition(".")[0] not in _firsts:
        binding = None
    else:
        binding = _lookup(module)
    _cache[module] = binding
    return binding


# --- Per-thread activations ------------------------------------------------------


class _Thread(_thread._local):
    def __init__(self) -> None:
        # (key, binding, True if the activation entered the instance, None
        # for a nested one) per step of a bound generator or coroutine
        # (3.11; key None).
        self.stack: list[tuple[object, _Binding, bool | None]] = []
        # scope id -> activations of it on the stack
        self.depth: dict[int, int] = {}


_tls = _Thread()
_rt: _native.Runtime | None = None


def _push(key: object, binding: _Binding) -> None:
    t = _tls
    sid = binding.sid
    n = t.depth.get(sid, 0)
    if n:
        # Already in an instance of this scope that bound code entered: stay in it.
        t.depth[sid] = n + 1
        t.stack.append((key, binding, None))
    else:
        # May raise ScopeCapacityError into the bound code; then nothing is
        # recorded and the frame's end event finds no entry of its own.
        # One native call, whose status comes back without allocating; the
        # violation number from before the entry, for the exit's report of a
        # refusal made since, is the runtime's to keep (Runtime.exited_seq).
        status = _rt.enter_plain(sid)
        if status:
            _native.check(status, "ap_enter", sid)
        t.depth[sid] = 1
        t.stack.append((key, binding, True))  # True: this activation entered it


def _pop(t: _Thread, exc: BaseException | None) -> None:
    _key, binding, _ = t.stack.pop()
    sid = binding.sid
    n = t.depth[sid] - 1
    if n:
        t.depth[sid] = n
        return
    del t.depth[sid]
    if exc is None:
        _rt.exit()  # _leave(), without an exception to judge
    else:
        _leave(binding, exc)


def _leave(binding: _Binding, exc: BaseException | None) -> None:
    """Leave the instance an activation of bound code entered; an exception
    the runtime caused there leaves as AllocError (a raise-mode scope)."""
    rt = _rt
    refused = False
    if exc is not None and binding.convert and isinstance(exc, Exception) and not isinstance(exc, AllocError):
        # Did the runtime cause it while our instance was innermost? A
        # refusal is counted on the instance that was innermost, whichever
        # limit refused; ours, entered by this activation, is innermost again
        # now that the exception left everything the bound code entered. Read
        # before leaving: an instance that ends may be reused at once.
        stats = rt.instance_stats(rt.current()[0])
        refused = stats is not None and stats.violations > 0
    rt.exit()
    if not refused:
        return  # no error, or a MemoryError the runtime did not cause: leave it alone
    err = refusal.convert(exc, rt, rt.exited_seq(), binding.name)
    try:
        if err is not None:
            refusal.raise_converted(err, exc)
    finally:
        # This frame ends up in the AllocError's traceback: its locals must not
        # keep the failed call's frames alive (see _scope.scope.__exit__).
        err = exc = None


# --- Python 3.12+: sys.monitoring --------------------------------------------------
#
# The callbacks are the runtime library's own (native/src/pymonitor.c): each
# thread's activations are kept there, and a call into bound code costs two C
# calls instead of two Python functions around it. The library asks
# _classify() about a code object it has not seen, and hands back the frames
# that an exception leaves (_leave_raising) and the entries it could not make
# (_entry_failed).

# Code objects of bound modules, kept alive while the library's table holds
# their addresses (so that an address stays theirs), and each scope's binding
# by its id, for the exits that judge an exception (old ones too: frames of a
# replaced policy may still be running).
_alive: list[object] = []
_by_sid: dict[int, _Binding] = {}
_tool: int | None = None
_table_full_warned = False


def _classify(code) -> int | None:
    """The scope id of a code object seen first (the library's ``classify``),
    or None: not bound (its events are disabled then)."""
    global _table_full_warned
    # Module and class bodies run once, at import: their objects live as long
    # as the module, and charging them to a short-lived instance would pin
    # that instance forever. Functions, methods, lambdas, generators and
    # coroutines have optimized locals.
    if not code.co_flags & _CO_OPTIMIZED:
        return None
    # The frame of the event: the library calls this from its callback,
    # which has no Python frame of its own.
    name = sys._getframe(1).f_globals.get("__name__")
    binding = _match(name) if isinstance(name, str) else None
    if binding is None:
        return None
    if not _rt.monitoring_bind(code, binding.sid):
        if not _table_full_warned:
            _table_full_warned = True
            _warn(f"{code.co_qualname} and further code of bound modules run unbound: "
                  "the runtime's table of bound code objects is full")
        return None
    _alive.append(code)
    return binding.sid


def _entry_failed(status: int, sid: int) -> None:
    _native.check(status, "ap_enter", sid)


def _leave_raising(sid: int, exc: BaseException) -> None:
    binding = _by_sid.get(sid)
    if binding is None:
        _rt.exit()
    else:
        _leave(binding, exc)


def _released() -> None:
    # The last activation ended after a policy without bound modules was
    # applied (called with the GIL, from the callback that ended it).
    if not _patterns:
        _release_monitoring()


def _install_monitoring() -> bool:
    global _tool
    _rt.monitoring_release_pending(False)
    mon = sys.monitoring
    if _tool is None:
        for tool in _TOOL_IDS:
            if mon.get_tool(tool) is None:
                mon.use_tool_id(tool, _TOOL_NAME)
                _tool = tool
                break
        else:
            _warn(
                "modules cannot be bound to scopes: the sys.monitoring tool ids "
                f"{', '.join(map(str, _TOOL_IDS))} are all taken by other tools"
            )
            return False
        callbacks = _rt.monitoring_callbacks(
            _classify, _entry_failed, _leave_raising, _released, mon.DISABLE
        )
        events = mon.events
        registered = (
            (events.PY_START, "start"), (events.PY_RESUME, "start"), (events.PY_THROW, "throw"),
            (events.PY_RETURN, "leave"), (events.PY_YIELD, "leave"), (events.PY_UNWIND, "unwind"),
        )
        mask = 0
        for event, name in registered:
            mon.register_callback(_tool, event, callbacks[name])
            mask |= event
        mon.set_events(_tool, mask)
    else:
        # Code that an earlier binding disabled may be bound now.
        mon.restart_events()
    return True


def _release_monitoring() -> None:
    global _tool
    _rt.monitoring_release_pending(False)
    if _tool is None:
        return
    mon = sys.monitoring
    mon.set_events(_tool, 0)
    events = mon.events
    for event in (events.PY_START, events.PY_RESUME, events.PY_THROW, events.PY_RETURN,
                  events.PY_YIELD, events.PY_UNWIND):
        mon.register_callback(_tool, event, None)
    mon.free_tool_id(_tool)
    _tool = None


# --- Python 3.11: wrappers -----------------------------------------------------------


def _wrap_function(fn: FunctionType, module: str) -> FunctionType | None:
    """A wrapper of ``fn`` that runs it in the scope ``module`` is bound to
    (looked up on every call, so that a new policy takes effect at once)."""
    flags = fn.__code__.co_flags
    if flags & _CO_ASYNC_GENERATOR:
        # Stepping an async generator from outside would need a proxy for
        # asend/athrow/aclose; its body runs bound when driven from bound code.
        return None
    if flags & _CO_GENERATOR:

        def bound(*args, **kwargs):
            enter, leave = _step_hooks(module)
            return (yield from stepping.drive(fn(*args, **kwargs), enter, leave))

    elif flags & _CO_COROUTINE:

        async def bound(*args, **kwargs):
            enter, leave = _step_hooks(module)
            return await stepping.Stepped(fn(*args, **kwargs), enter, leave)

    else:

        def bound(*args, **kwargs):
            # _push and _pop, inline: a call returns before its caller does,
            # so the activation needs no entry on the thread's stack, only
            # its count (the stack is for the generators' and coroutines'
            # steps, which do not nest that way).
            binding = _match(module)
            if binding is None:
                return fn(*args, **kwargs)
            depth = _tls.depth
            sid = binding.sid
            n = depth.get(sid)
            if n:
                # Bound code calling bound code: in the instance already.
                depth[sid] = n + 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    depth[sid] -= 1
            status = _rt.enter_plain(sid)  # see _push
            if status:
                _native.check(status, "ap_enter", sid)
            depth[sid] = 1
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                del depth[sid]
                _leave(binding, exc)
                raise
            del depth[sid]
            _rt.exit()  # as in _pop
            return result

    functools.update_wrapper(bound, fn)
    setattr(bound, _MARK, module)
    return bound


def _step_hooks(module: str):
    """What runs around each step of a generator or coroutine of ``module``:
    the bound scope during the step (looked up at each step, so that a new
    policy takes effect at once), nothing while it is suspended."""

    def enter() -> _Binding | None:
        binding = _match(module)
        if binding is not None:
            _push(None, binding)
        return binding

    def leave(binding: _Binding | None, exc: BaseException | None) -> None:
        if binding is not None:
            _pop(_tls, exc)

    return enter, leave


def _wrapped(value: object, module: str) -> object | None:
    """The bound replacement of a namespace entry defined in ``module``, or None."""
    if isinstance(value, FunctionType):
        if value.__module__ == module and not hasattr(value, _MARK):
            return _wrap_function(value, module)
        return None
    if isinstance(value, (staticmethod, classmethod)):
        inner = _wrapped(value.__func__, module)
        return type(value)(inner) if inner is not None else None
    if type(value) is property:
        parts = [value.fget, value.fset, value.fdel]
        new = [_wrapped(p, module) if p is not None else None for p in parts]
        if not any(new):
            return None
        return property(*(n or p for n, p in zip(new, parts)), value.__doc__)
    return None


def _bind_class(cls: type, module: str, seen: set[int]) -> None:
    if id(cls) in seen:
        return
    seen.add(id(cls))
    for attr, value in list(vars(cls).items()):
        if isinstance(value, type):
            if value.__module__ == module and value.__qualname__.startswith(cls.__qualname__ + "."):
                _bind_class(value, module, seen)
            continue
        new = _wrapped(value, module)
        if new is None:
            continue
        try:
            setattr(cls, attr, new)
        except (AttributeError, TypeError):
            return  # an extension type or a metaclass that refuses: leave the class as it is


def _bind_module(module: ModuleType) -> None:
    name = getattr(module, "__name__", None)
    if not isinstance(name, str) or _match(name) is None:
        return
    namespace = getattr(module, "__dict__", None)
    if not isinstance(namespace, dict):
        return
    seen: set[int] = set()
    for attr, value in list(namespace.items()):
        if isinstance(value, type):
            if value.__module__ == name:
                _bind_class(value, name, seen)
            continue
        new = _wrapped(value, name)
        if new is not None:
            namespace[attr] = new


class _Finder:
    """First on ``sys.meta_path``: wraps bound modules right after they execute."""

    def find_spec(self, name, path=None, target=None):
        if _match(name) is None:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        # Loaders shared by every module (classes with classmethods, such as
        # BuiltinImporter) are left alone; file loaders are one per module.
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module

        def exec_module(module):
            try:
                original(module)
            finally:
                try:
                    del loader.exec_module  # back to the class's method
                except AttributeError:
                    pass
            _bind_module(module)

        try:
            loader.exec_module = exec_module
        except AttributeError:
            pass  # __slots__: the module stays unwrapped until the next policy is applied
        return spec

    def invalidate_caches(self) -> None:
        pass


_finder = _Finder()


def _install_wrappers() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    for name, module in list(sys.modules.items()):
        if isinstance(module, ModuleType) and _match(name) is not None:
            _bind_module(module)


# --- Applying a policy ---------------------------------------------------------------

_lock = _atfork.lock()


def _warn(message: str) -> None:
    warnings.warn(message, AllocPolicyWarning, stacklevel=4)


def apply(policy, rt: _native.Runtime | None = None) -> None:
    """Bind the modules of ``policy``'s scopes, replacing earlier bindings.

    Called whenever a policy is applied (startup, :func:`allocpolicy.configure`).
    Without a preloaded runtime there is nothing to enter and nothing is bound.
    """
    global _rt, _patterns, _cache, _firsts
    rt = rt or _native.runtime()
    if rt is None:
        return
    scoped = [sc for sc in policy.scopes.values() if sc.modules]
    if not scoped and not _patterns:
        return  # never bound anything: stay out of the way entirely
    patterns = []
    for sc in scoped:
        binding = _Binding(sc.name, scope_id(rt, sc.name), sc.on_oom == "raise")
        for pattern in sc.modules:
            segments = pattern.split(".")
            patterns.append((segments, segments[-1] == "*", binding))
    firsts = {segments[0] for segments, _, _ in patterns}
    with _lock:
        _rt = rt
        _patterns = patterns
        _firsts = None if "*" in firsts else frozenset(firsts)
        _cache = {}
        if _MONITORING:
            for _, _, binding in patterns:
                _by_sid[binding.sid] = binding
            # The table first: then no address in it names a freed code object.
            rt.monitoring_clear()
            _alive.clear()
            if patterns:
                _install_monitoring()
            elif _tool is not None and rt.monitoring_inflight():
                # Threads are inside bound code: keep the tool until they
                # leave it, so that their entries are popped (the library
                # calls _released() after the last one).
                rt.monitoring_release_pending(True)
            else:
                _release_monitoring()
        elif patterns:
            _install_wrappers()
        elif _finder in sys.meta_path:
            # Existing wrappers stay in place and find no binding.
            sys.meta_path.remove(_finder)


def activate_from_environment(text: str | None) -> None:
    """At startup under ``allocpolicy run --policy FILE``: bind the modules of
    the policy, whose ``text`` ``run`` handed over (``None``: only its file
    is named).

    Most policies bind no module, and every interpreter started under the
    runtime comes here; a policy that cannot declare the key (neither the word
    nor a TOML escape that could spell it) is not parsed at all.
    """
    if text is not None and "modules" not in text and "\\" not in text:
        return
    # Only now: _config (and the policy model it loads) is not
    # imported at startup unless the policy binds modules.
    from . import _config

    policy = _config.active_policy()
    try:
        apply(policy)
    except AllocPolicyError as err:
        # At interpreter startup nobody could catch it: say so and run unbound.
        _warn(f"the modules of the policy {policy.source} are not bound to their scopes: {err}")

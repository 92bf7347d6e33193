"""In-process mode: :func:`install` in a running interpreter, without a relaunch.

Under ``allocpolicy run`` the preloaded library interposes ``malloc`` for the
whole process. A notebook, an embedded interpreter or a test run cannot be
relaunched that way; :func:`install` gets as close as Python itself allows, the
way :func:`tracemalloc.start` does:

- Python's RAW allocator domain (``PyMem_RawMalloc``: large objects, since
  pymalloc hands every request over 512 bytes to it) is wrapped by a layer that
  charges every block, decided before the allocator below is called;
- pymalloc's arenas (small objects) are charged by the arena hook, as under the
  preload;
- when the MEM and OBJ domains are plain ``malloc`` (``PYTHONMALLOC=malloc``)
  they are charged like RAW, since no arena hook sees them then;
- NumPy's array data goes through a NEP 49 data handler that charges it,
  installed as soon as NumPy's core module is imported, now or later.

What it cannot see, and the exact guarantees of :func:`uninstall`, are in
``docs/inprocess.rst``; how the layers work is in ``native/src/hooks_pymem.c``.
"""

from __future__ import annotations

import contextvars
import faulthandler
import os
import sys
import sysconfig
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

from . import _atfork, _config, _configure, _loops, _native
from ._core import postimport, refusal_sites
from ._errors import AllocPolicyWarning, RuntimeLoadError

if TYPE_CHECKING:
    from ._policy import Policy

__all__ = ["install", "uninstall", "is_installed"]

# NumPy 2 keeps its C core in numpy._core, NumPy 1 in numpy.core.
_NUMPY_CORE = ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath")

_lock = _atfork.rlock()
_state: _Installed | None = None
# How CPython's allocators lay out blocks does not change while the process
# runs; learnt once, while nobody's hooks hide it.
_kinds: tuple[str, bool] | None = None
# hooks_pyarena.c's arena allocator, once it has been installed: uninstall()
# takes it off, a later install() puts the same one back.
_arena_ours: _native.ArenaAllocatorC | None = None


def is_installed() -> bool:
    """True between :func:`install` and :func:`uninstall` in a process without
    the preload (under the preload :func:`install` hooks nothing, and
    :func:`~allocpolicy.is_active` is what tells that budgets apply)."""
    return _state is not None


def install(policy: Policy | Mapping | str | os.PathLike | None = None) -> Policy:
    """Enforce ``policy`` in this running interpreter; returns the policy in force.

    ``policy`` is what :func:`~allocpolicy.configure` takes, or ``None`` for the
    policy already active (the built-in default unless one was configured).
    Without the preload, this loads the runtime into the process and hooks
    Python's allocator domains and NumPy's data handler; from then on
    :func:`~allocpolicy.scope`, :func:`~allocpolicy.task` and
    :func:`~allocpolicy.stats` work as under ``allocpolicy run``, for the
    memory those hooks see (``docs/inprocess.rst``). Installing again only
    applies the new policy.

    Under the preload the runtime already counts every allocation of the
    process; hooking Python's allocators as well would count their blocks
    twice, so ``install()`` then only applies ``policy``.

    A wrong ``policy`` raises :class:`TypeError` or
    :class:`~allocpolicy.PolicyError` and changes nothing;
    :class:`~allocpolicy.RuntimeLoadError` if the runtime cannot be loaded or
    Python's allocators cannot be wrapped (nothing is left hooked then).
    """
    global _state
    new = _parse(policy)
    with _lock:
        if _state is None and _native.runtime() is not None:
            # Preloaded: every malloc is already counted.
            return _configure.configure(new) if new is not None else _config.active_policy()
        if _state is not None:
            active = _configure.configure(new) if new is not None else _config.active_policy()
            _state.settle(_state.rt.hooks_lost())
            return active
        _state = _Installed.start(new)
        _loops.follow()
        return _config.active_policy()


def uninstall() -> None:
    """Give Python back the allocators it had before :func:`install`.

    Every allocator domain, pymalloc's arena allocator and NumPy's handler (in
    the calling thread's context) are again exactly what they were, unless
    another tool hooked them in the meantime and still does (tracemalloc
    started after :func:`install`): the runtime's layer then stays in that
    tool's chain passing calls through, an :class:`AllocPolicyWarning` says
    so, and the next :func:`install` or :func:`uninstall` finds it. Blocks
    allocated while installed stay valid blocks of those allocators. Scopes
    entered afterwards are not enforced.

    Raises :class:`RuntimeError` and changes nothing while a scope instance is
    still active (entered and not left on some thread, or held by a
    :func:`~allocpolicy.bind` wrapper): its exit would have no runtime left to
    go to. Does nothing when not installed, and under the preload.
    """
    global _state
    with _lock:
        state = _state
        if state is None:
            return
        busy = state.active_instances()
        if busy:
            raise RuntimeError(
                f"uninstall(): {busy} scope instance(s) are still active (entered and not "
                "left, or held by bind()); leave them first"
            )
        below = state.stop()
        _native.use_runtime(None)
        _state = None
    if below:
        warnings.warn(
            f"uninstall(): another hook was installed over allocpolicy's on Python's "
            f"{', '.join(below)} allocator domain(s) after install() (tracemalloc started "
            "later?); allocpolicy's layer stays in its chain, passing calls through without "
            "counting, until that hook is removed and uninstall() runs again",
            AllocPolicyWarning,
            stacklevel=2,
        )


def _parse(policy: object) -> Policy | None:
    """The policy to apply, checked before anything changes."""
    if policy is None:
        return None
    return _configure.policy_argument(
        policy, "install(): argument 'policy' must be a Policy, a mapping, a path or None"
    )


def _allocator_kinds() -> tuple[str, bool]:
    """("pymalloc" or "malloc", debug hooks?) for this interpreter."""
    global _kinds
    if _kinds is not None:
        return _kinds
    name = _native.allocator_name()
    if name is None:
        import tracemalloc

        if not tracemalloc.is_tracing():
            raise RuntimeLoadError(
                "install(): Python's allocators were replaced by a tool other than "
                "tracemalloc, so how they lay out blocks is unknown; call install() before "
                "that tool starts, or run the program under `allocpolicy run`"
            )
        # tracemalloc's hooks hide the name; they pass blocks through unchanged,
        # so the configuration CPython started with still describes them.
        name = _configured_allocator_name()
    base, _, debug = name.partition("_")
    _kinds = (base, debug == "debug")
    return _kinds


def _configured_allocator_name() -> str:
    """What CPython chose at startup (PYTHONMALLOC, -X dev, a debug build)."""
    debug = bool(sys.flags.dev_mode) or hasattr(sys, "gettotalrefcount")
    base = "pymalloc" if sysconfig.get_config_var("WITH_PYMALLOC") != 0 else "malloc"
    env = "" if sys.flags.ignore_environment else os.environ.get("PYTHONMALLOC", "")
    if env in ("malloc", "malloc_debug"):
        base = "malloc"
    elif env in ("pymalloc", "pymalloc_debug"):
        base = "pymalloc"
    if env in ("debug", "malloc_debug", "pymalloc_debug"):
        debug = True
    elif env in ("malloc", "pymalloc"):
        debug = False
    return f"{base}_debug" if debug else base


def _plan() -> dict[int, int]:
    """Which domains get an accounting layer, and of which kind.

    RAW always: nothing else sees its blocks in-process. MEM and OBJ only when
    they are plain malloc; over pymalloc, the arena hook charges small objects
    and pymalloc passes large ones to RAW, so accounting them there too would
    count those twice. Observing layers for MEM and OBJ come later, when
    something watches Python's allocations (Runtime.install_domain_hooks).
    """
    base, debug = _allocator_kinds()
    how = _native.PYHOOK_ACCOUNT_DEBUG if debug else _native.PYHOOK_ACCOUNT
    plan = {_native.PYMEM_RAW: how}
    if base == "malloc":
        plan[_native.PYMEM_MEM] = how
        plan[_native.PYMEM_OBJ] = how
    return plan


class _Numpy:
    """Our data handler for one NumPy, and where it is in force.

    NumPy keeps the handler in a context variable: threads start with a fresh
    context, which has NumPy's default. So the handler is set in the context
    that installs it and again, lazily, at the first scope entry in every
    other context (see _Installed.before_enter).
    """

    def __init__(self, rt: _native.InprocessRuntime, module: object) -> None:
        self.rt = rt
        self.api = _native.NumpyApi(module._ARRAY_API)  # type: ignore[attr-defined]
        self.previous = self.api.get_handler()
        self.ours = rt.numpy_capsule(self.previous)
        self.in_context = contextvars.ContextVar("allocpolicy_numpy_handler", default=False)

    def here(self) -> None:
        """Use our handler in the calling context, unless the program chose
        another handler there."""
        if self.api.get_handler() is self.previous:
            self.api.set_handler(self.ours)
        self.in_context.set(True)

    def stop(self) -> None:
        if self.api.get_handler() is self.ours:
            self.api.set_handler(self.previous)
        # Other contexts keep the handler, and arrays keep the handler that
        # allocated them: it stays valid and only stops charging.
        self.rt.numpy_set_active(self.ours, False)


class _NumpyFinder:
    """Sees NumPy's core module being imported, and calls back once it ran."""

    def __init__(self, then) -> None:
        self._then = then
        self._busy = False

    def find_spec(self, name, path, target=None):
        if name not in _NUMPY_CORE or self._busy:
            return None
        self._busy = True
        try:
            spec = postimport.spec_behind(self, name, path, target)
        finally:
            self._busy = False
        return postimport.wrap_loader(spec, self._then)

    def invalidate_caches(self) -> None:
        pass


class _Installed:
    """What install() did, so that uninstall() undoes exactly that."""

    def __init__(self, rt: _native.InprocessRuntime, plan: dict[int, int]) -> None:
        self.rt = rt
        self.plan = plan
        self.hooked: list[int] = []
        self.arena_original: _native.ArenaAllocatorC | None = None
        self.numpy: _Numpy | None = None
        self.finder: _NumpyFinder | None = None
        self.failed: set[int] = set()
        self.faulthandler = False

    @classmethod
    def start(cls, policy: Policy | None) -> _Installed:
        rt = _native.load_inprocess()
        state = cls(rt, _plan())
        _native.use_runtime(rt)
        try:
            _configure.configure(policy if policy is not None else _config.active_policy())
            state._hook_domains()
            state._hook_arenas()
            refusal_sites.enable(rt)  # as under the preload (see allocpolicy._activate)
            state._watch_numpy()
            rt.before_enter = state.before_enter
            rt.settle = state.settle
        except BaseException:
            state.stop()
            _native.use_runtime(None)
            raise
        if not faulthandler.is_enabled():
            # An abort-mode diagnostic is followed by the Python traceback.
            faulthandler.enable(file=rt.process_stats().report_fd, all_threads=True)
            state.faulthandler = True
        return state

    # -- Python's allocator domains -------------------------------------------------

    def _hook_domains(self) -> None:
        for domain, how in self.plan.items():
            status = self.rt.hook_domain(domain, how)
            if status != _native.OK:
                raise RuntimeLoadError(
                    f"install(): cannot wrap Python's {_native.PYMEM_DOMAIN_NAMES[domain]} "
                    f"allocator domain: {_status_reason(status)}"
                )
            self.hooked.append(domain)

    def settle(self, lost: int) -> None:
        """Put back the layers of the domains in ``lost`` that no longer see
        requests (tracemalloc.stop() restored what it found under them)."""
        for domain, name in enumerate(_native.PYMEM_DOMAIN_NAMES):
            if not lost & (1 << domain) or domain in self.failed:
                continue
            # Domains outside the plan only ever had observing layers.
            status = self.rt.hook_domain(domain, self.plan.get(domain, _native.PYHOOK_OBSERVE))
            if status != _native.OK:
                self.failed.add(domain)
                warnings.warn(
                    f"allocpolicy lost its hook on Python's {name} allocator domain and "
                    f"cannot put it back ({_status_reason(status)}); that domain is no "
                    "longer counted",
                    AllocPolicyWarning,
                    stacklevel=4,
                )

    def before_enter(self) -> None:
        """Before every scope entry (InprocessRuntime.enter): NumPy's handler
        in this context, one context-variable read once it is there."""
        numpy = self.numpy
        if numpy is not None and not numpy.in_context.get():
            numpy.here()

    # -- pymalloc's arenas ---------------------------------------------------------------

    def _hook_arenas(self) -> None:
        global _arena_ours
        current = self.rt.arena_allocator()
        if _arena_ours is not None and current.key() == _arena_ours.key():
            return
        self.arena_original = current
        if _arena_ours is None:
            self.rt.install_arena_hook()
            _arena_ours = self.rt.arena_allocator()
        else:
            # hooks_pyarena.c installs itself once per process; put it back.
            self.rt.set_arena_allocator(_arena_ours)

    def _unhook_arenas(self) -> None:
        original = self.arena_original
        if original is None or _arena_ours is None:
            return
        if self.rt.arena_allocator().key() == _arena_ours.key():
            self.rt.set_arena_allocator(original)
        self.arena_original = None

    # -- NumPy -------------------------------------------------------------------------------

    def _watch_numpy(self) -> None:
        for name in _NUMPY_CORE:
            module = sys.modules.get(name)
            if module is not None:
                self._numpy_appeared(module)
                return
        self.finder = _NumpyFinder(self._numpy_appeared)
        sys.meta_path.insert(0, self.finder)

    def _numpy_appeared(self, module: object) -> None:
        if self.numpy is not None:
            return
        try:
            self.numpy = _Numpy(self.rt, module)
            self.numpy.here()
        except (RuntimeLoadError, AttributeError, TypeError, ValueError) as err:
            self.numpy = None
            warnings.warn(
                f"NumPy's array data will not be charged to scopes: {err}",
                AllocPolicyWarning,
                stacklevel=2,
            )

    # -- uninstall ---------------------------------------------------------------------------

    def active_instances(self) -> int:
        rt = self.rt
        total = 0
        for sid in range(1, rt.process_stats().scopes):
            st = rt.scope_stats(sid)
            if st is not None:
                total += st.active
        return total

    def stop(self) -> list[str]:
        """Undo everything, in the reverse order; the domains left below
        another tool's hook."""
        self.rt.before_enter = None
        self.rt.settle = None
        if self.finder is not None:
            try:
                sys.meta_path.remove(self.finder)
            except ValueError:
                pass
            self.finder = None
        if self.numpy is not None:
            self.numpy.stop()
            self.numpy = None
        self._unhook_arenas()
        below = []
        # Every domain, not only the planned ones: observing layers may have
        # been added since (install_domain_hooks).
        for domain in reversed(range(len(_native.PYMEM_DOMAIN_NAMES))):
            if self.rt.unhook_domain(domain) == _native.ESTATE:
                below.append(_native.PYMEM_DOMAIN_NAMES[domain])
        self.hooked.clear()
        if self.faulthandler:
            faulthandler.disable()
            self.faulthandler = False
        return below


def _status_reason(status: int) -> str:
    if status == _native.ESTATE:
        return "its blocks are not laid out as CPython's configuration says"
    if status == _native.EFULL:
        return "the runtime's table of layers is full"
    return f"status {status}"

"""The only module that touches ctypes: finding, checking and calling the runtime.

The native library is either preloaded (``LD_PRELOAD``, usually by ``allocpolicy
run``), in which case it already governs every ``malloc`` of the process and we
must bind to *that* copy, or only shipped inside the package, in which case
nothing is interposed and the runtime is inactive.

Binding to the preloaded copy goes through the global symbol namespace
(``dlopen(NULL)``): a second ``dlopen`` of a copy at another path would be a
second, separate instance with its own (empty) tables.
"""

from __future__ import annotations

import ctypes
import os
import _thread
from typing import Any

from . import _atfork, _checkout
from ._fastcalls import FastCalls
from ._errors import RuntimeLoadError, ScopeCapacityError

ABI_VERSION = 5
ENV_LIBRARY = "ALLOCPOLICY_LIBRARY"
LIBRARY_NAME = "liballocpolicy.so"
SCOPE_NAME_MAX = 64
#: AP_MAX_DEPTH: scopes nested on one thread.
MAX_DEPTH = 32

# Status codes of allocpolicy.h.
OK, EINVAL, ENOENT, EFULL, ESTATE, EPARSE, EREFUSED = 0, -1, -2, -3, -4, -5, -6
EXIT_REGION = 1
#: ap_exit_tagged(): the innermost level is not that block's entry.
EXIT_NOT_INNERMOST = 2
#: ap_step_leave: the thread recorded a violation during the step.
STEP_REFUSED = 1
ACTION_FROM_SCOPE = 0xFFFFFFFF
MODES = ("raise", "abort", "fallible")
REASONS = ("none", "budget", "oom", "injected", "forbidden")
#: ap_limit, by index; "machine": a reservation the machine cannot spare
#: (cgroup v2 or MemAvailable, minus the policy's reserve_margin).
LIMITS = (None, "budget", "total_budget", "process", "reservation", "machine")
#: ap_action, by index: what a forbidden allocation or an overdraft does.
ACTIONS = ("raise", "abort", "warn", "count")
#: ap_domain, by index.
DOMAINS = ("libc", "py_arena", "py_raw", "py_mem", "py_obj", "numpy")
INJECT_PERSISTENT = 1
INJECT_ANY_SCOPE = 0xFFFFFFFF


#: What EFULL means from each call that can reach one of the runtime's fixed capacities.
_CAPACITY = {
    "ap_enter": (
        "cannot enter another scope: nesting is limited to 32 per thread and "
        "65536 instances may be active at once"
    ),
    "ap_attach": "cannot attach to the bound scope instance: nesting is limited to 32 per thread",
    "ap_reserve": "at most 16 reservations can be active on one thread",
    "ap_region_enter": "at most 16 regions can be open on one thread",
}


def check(status: int, call: str, *args: object, failure: str | None = None) -> None:
    """Raise what the status that ``call(*args)`` returned means, unless it is OK.

    The one map from the runtime's status codes to exceptions: EFULL from a
    call with a fixed capacity is :class:`ScopeCapacityError` (the program
    asked for too much at once); anything else unexpected is
    :class:`RuntimeLoadError` (the library and this package disagree), saying
    ``failure`` when the caller can name what failed better than the call.
    """
    if status == OK:
        return
    if status == EFULL and call in _CAPACITY:
        raise ScopeCapacityError(_CAPACITY[call])
    if failure is not None:
        raise RuntimeLoadError(f"{failure} ({call}: status {status})")
    raise RuntimeLoadError(f"{call}({', '.join(map(str, args))}) failed with status {status}")


class Violation(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("reason", ctypes.c_uint32),
        ("seq", ctypes.c_uint64),
        ("scope", ctypes.c_uint32),
        ("instance", ctypes.c_uint32),
        ("limit", ctypes.c_uint32),
        ("domain", ctypes.c_uint32),
        ("requested", ctypes.c_uint64),
        ("budget", ctypes.c_int64),
        ("live", ctypes.c_int64),
        ("index", ctypes.c_uint64),
        ("py_code", ctypes.c_uint64),
        ("py_instr", ctypes.c_uint64),
    ]


class FrameProbeC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("cframe", ctypes.c_int32),
        ("current", ctypes.c_int32),
        ("code", ctypes.c_int32),
        ("instr", ctypes.c_int32),
        ("thread_state", ctypes.c_void_p),
    ]


class MonHooksC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("classify", ctypes.c_void_p),
        ("entry_failed", ctypes.c_void_p),
        ("leave_raising", ctypes.c_void_p),
        ("released", ctypes.c_void_p),
        ("disable", ctypes.c_void_p),
        ("enter", ctypes.c_void_p),
    ]


class ScopeStatsC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("mode", ctypes.c_uint32),
        ("name", ctypes.c_char * SCOPE_NAME_MAX),
        ("budget", ctypes.c_int64),
        ("total_budget", ctypes.c_int64),
        ("live", ctypes.c_int64),
        ("peak", ctypes.c_int64),
        ("allocations", ctypes.c_uint64),
        ("violations", ctypes.c_uint64),
        ("instances", ctypes.c_uint64),
        ("active", ctypes.c_uint64),
        ("escaped", ctypes.c_int64),
        ("grace_bytes", ctypes.c_int64),
        ("max_instance_peak", ctypes.c_int64),
        ("reservations", ctypes.c_uint64),
        ("refused_reservations", ctypes.c_uint64),
        ("overdrafts", ctypes.c_uint64),
        ("overdraft_bytes", ctypes.c_int64),
        ("forbidden", ctypes.c_uint64),
        ("injected", ctypes.c_uint64),
        ("refused", ctypes.c_uint64 * len(REASONS)),  # violations by reason, indexed like REASONS
    ]


class InstanceStatsC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("scope", ctypes.c_uint32),
        ("parent", ctypes.c_uint32),
        ("ended", ctypes.c_uint32),
        ("budget", ctypes.c_int64),
        ("live", ctypes.c_int64),
        ("peak", ctypes.c_int64),
        ("allocations", ctypes.c_uint64),
        ("violations", ctypes.c_uint64),
        ("escaped", ctypes.c_int64),
    ]


class ProcessStatsC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("preloaded", ctypes.c_uint32),
        ("budget", ctypes.c_int64),
        ("live", ctypes.c_int64),
        ("peak", ctypes.c_int64),
        ("allocations", ctypes.c_uint64),
        ("violations", ctypes.c_uint64),
        ("arenas_live", ctypes.c_uint64),
        ("foreign_frees", ctypes.c_uint64),
        ("scopes", ctypes.c_uint32),
        ("arena_hook", ctypes.c_uint32),
        ("grace", ctypes.c_int64),
        ("report_fd", ctypes.c_int32),
        ("reserved", ctypes.c_uint32),
        ("reserve_margin", ctypes.c_int64),
    ]


class ReservationC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("instance", ctypes.c_uint32),
        ("reserved", ctypes.c_int64),
        ("left", ctypes.c_int64),
        ("peak_used", ctypes.c_int64),
        ("overdrafts", ctypes.c_uint64),
        ("overdraft_bytes", ctypes.c_int64),
        ("first_overdraft", ctypes.c_uint64),
        ("action", ctypes.c_uint32),
        ("refused", ctypes.c_uint32),
        ("serial", ctypes.c_uint64),
    ]


class RegionC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("action", ctypes.c_uint32),
        ("frees", ctypes.c_uint32),
        ("domains", ctypes.c_uint32),
        ("instance", ctypes.c_uint32),
        ("first_domain", ctypes.c_uint32),
        ("allocations", ctypes.c_uint64),
        ("frees_seen", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("bytes_freed", ctypes.c_uint64),
        ("first_size", ctypes.c_uint64),
        ("refused", ctypes.c_uint64),
    ]


class CensusC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("open", ctypes.c_uint32),
        ("allocations", ctypes.c_uint64),
        ("frees", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("bytes_freed", ctypes.c_uint64),
    ]


class InjectConfigC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("nth", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("stop", ctypes.c_uint64),
        ("every", ctypes.c_uint64),
        ("probability", ctypes.c_uint64),
        ("seed", ctypes.c_uint64),
        ("min_size", ctypes.c_uint64),
        ("max_size", ctypes.c_uint64),
        ("scope", ctypes.c_uint32),
        ("domains", ctypes.c_uint32),
    ]


class InjectStatsC(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("active", ctypes.c_uint32),
        ("seen", ctypes.c_uint64),
        ("injected", ctypes.c_uint64),
        ("first_index", ctypes.c_uint64),
        ("last_index", ctypes.c_uint64),
    ]


#: AP_LIB_UNKNOWN: the index of allocations made by code in no loaded object.
LIB_UNKNOWN = 0xFFFFFFFF


class LibStatsC(ctypes.Structure):
    """ap_lib_stats: one shared object's allocations while the report is on."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("name", ctypes.c_char * 96),
        ("scope", ctypes.c_uint32),
        ("loaded", ctypes.c_uint32),
        ("bytes", ctypes.c_uint64),
        ("allocations", ctypes.c_uint64),
        ("failures", ctypes.c_uint64),
    ]


def _sized(struct_type):
    value = struct_type()
    value.size = ctypes.sizeof(struct_type)
    return value


def library_path() -> str:
    """Absolute path of the runtime library shipped with this package.

    ``ALLOCPOLICY_LIBRARY`` overrides it. A package imported from a source
    checkout uses the checkout's ``native/build/``, built first if missing or
    stale. Raises :class:`RuntimeLoadError` if there is no library to use.
    """
    override = os.environ.get(ENV_LIBRARY)
    if override:
        if os.path.isfile(override):
            return os.path.realpath(override)
        raise RuntimeLoadError(
            f"{ENV_LIBRARY} names {override!r}, which is not a file; unset it to use the "
            "library shipped with the package"
        )
    here = os.path.dirname(os.path.realpath(__file__))
    native = _checkout.native_dir(here)
    if native is not None:
        return _checkout.library(here, native, [LIBRARY_NAME, INPROCESS_LIBRARY_NAME])
    path = os.path.join(here, "_lib", LIBRARY_NAME)
    if os.path.isfile(path):
        return os.path.realpath(path)
    raise RuntimeLoadError(
        f"the allocpolicy runtime library {path} is missing from the installed package "
        f"{here}; reinstall it (`pip install --force-reinstall allocpolicy`, or "
        "`pip install .` in a checkout)"
    )


def _preloaded_path() -> str | None:
    """Path of the mapped file that provides ap_abi_version, if any is mapped."""
    # Bytes: paths in the maps are the file system's, in no particular
    # encoding, and a text open would depend on the locale (and warn under
    # -X warn_default_encoding in every program started under the runtime).
    try:
        with open("/proc/self/maps", "rb") as f:
            maps = f.read()
    except OSError:
        return None
    names = (LIBRARY_NAME.encode(), LIBRARY_NAME.encode() + b".1")
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[5].endswith(names):
            return os.fsdecode(parts[5])
    return None


class Runtime:
    """Typed access to one loaded copy of the runtime library."""

    def __init__(self, handle: ctypes.CDLL, gil_handle: ctypes.PyDLL, path: str | None):
        self.path = path
        self._lib = handle
        self._gil_lib = gil_handle
        version = handle.ap_abi_version()
        if version != ABI_VERSION:
            raise RuntimeLoadError(
                f"runtime library {path or '(preloaded)'} has ABI version {version}, "
                f"this package needs {ABI_VERSION}; preload the library of this installation "
                "(`allocpolicy lib` prints its path)"
            )
        u32p = ctypes.POINTER(ctypes.c_uint32)
        sig = {
            "ap_is_preloaded": ([], ctypes.c_int),
            "ap_configure": ([ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t)], ctypes.c_int),
            "ap_scope_find": ([ctypes.c_char_p, u32p], ctypes.c_int),
            "ap_enter": ([ctypes.c_uint32, u32p], ctypes.c_int),
            "ap_set_budget": ([ctypes.c_uint32, ctypes.c_int64], ctypes.c_int),
            "ap_enter_noting": ([ctypes.c_uint32, u32p, ctypes.POINTER(ctypes.c_uint64)], ctypes.c_int),
            "ap_attach": ([ctypes.c_uint32], ctypes.c_int),
            "ap_hold": ([ctypes.c_uint32], ctypes.c_int),
            "ap_release": ([ctypes.c_uint32], ctypes.c_int),
            "ap_exit": ([], ctypes.c_int),
            "ap_current": ([u32p, u32p], ctypes.c_int),
            "ap_flush": ([], None),
            "ap_last_violation": ([ctypes.POINTER(Violation)], ctypes.c_int),
            "ap_set_frame_probe": ([ctypes.POINTER(FrameProbeC)], ctypes.c_int),
            "ap_get_scope_stats": ([ctypes.c_uint32, ctypes.POINTER(ScopeStatsC)], ctypes.c_int),
            "ap_get_instance_stats": (
                [ctypes.c_uint32, ctypes.POINTER(InstanceStatsC)],
                ctypes.c_int,
            ),
            "ap_get_process_stats": ([ctypes.POINTER(ProcessStatsC)], ctypes.c_int),
            "ap_reserve": ([ctypes.c_int64, ctypes.c_uint32, ctypes.POINTER(Violation)], ctypes.c_int),
            "ap_unreserve": ([ctypes.POINTER(ReservationC)], ctypes.c_int),
            "ap_reservation_get": ([ctypes.POINTER(ReservationC)], ctypes.c_int),
            "ap_region_enter": ([ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32], ctypes.c_int),
            "ap_region_exit": ([ctypes.POINTER(RegionC)], ctypes.c_int),
            "ap_region_last": ([ctypes.POINTER(RegionC)], ctypes.c_int),
            "ap_census_open": ([], ctypes.c_int),
            "ap_census_close": ([], ctypes.c_int),
            "ap_census_read": ([ctypes.POINTER(CensusC)], ctypes.c_int),
            "ap_inject_set": ([ctypes.POINTER(InjectConfigC)], ctypes.c_int),
            "ap_inject_get": ([ctypes.POINTER(InjectStatsC)], ctypes.c_int),
            "ap_libs_count": ([u32p], ctypes.c_int),
            "ap_lib_get": ([ctypes.c_uint32, ctypes.POINTER(LibStatsC)], ctypes.c_int),
            "ap_libs_report": ([ctypes.c_uint32, ctypes.c_int32], ctypes.c_int),
            "ap_lib_find": ([ctypes.c_void_p, u32p], ctypes.c_int),
        }
        for name, (argtypes, restype) in sig.items():
            fn = getattr(handle, name)
            fn.argtypes = argtypes
            fn.restype = restype
        install = gil_handle.ap_py_install_arena_hook
        install.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        install.restype = ctypes.c_int
        self._install_arena = install
        self.preloaded = bool(handle.ap_is_preloaded())
        # Bound once: the exit path must not look anything up (see exit()).
        # A scope's entry and exit, on every task boundary, and a task's
        # steps (_core/stepping.py) call the runtime through built-in
        # functions (_fastcalls.py), a tenth of a ctypes call's cost, which
        # make no object: the entry's result must not allocate, because
        # whatever is allocated after it is the new instance's and may be
        # refused, with the instance entered and nobody to leave it. The
        # violation number from before the entry is read when a boundary
        # needs it: entry_seq() while the instance is innermost, exited_seq()
        # right after its exit.
        calls = FastCalls(gil_handle, check)
        # enter_marked(scope_id, block) and exit_tagged(block) name the level
        # by the `with` block's object (its tag is the low 32 bits of the
        # object's address, its id()): the runtime checks it against the
        # innermost level, which pairs entries with exits there instead of in
        # a record per thread here (see _scope.py). exit_unmarked() leaves a
        # level entered otherwise.
        self.enter_marked = calls.make("ap_enter_marked", "s_uo")
        self.enter_plain = calls.make("ap_enter_plain", "s_u")
        self.entry_seq = calls.make("ap_entry_seq", "q")
        self.exited_seq = calls.make("ap_exited_seq", "q")
        self.exit_tagged = calls.make("ap_exit_tagged", "s_o")
        self.exit_unmarked = calls.make("ap_exit_unmarked", "s")
        self.abandon = gil_handle.ap_abandon
        self._exit = calls.make("ap_exit", "s")
        # step_enter(chain, levels, seq) and step_leave(instance, levels,
        # seq) take their pointers as addresses (ctypes.addressof).
        self.step_enter = calls.make("ap_step_enter", "s_pup")
        self.step_leave = calls.make("ap_step_leave", "s_uup")
        self._fastcalls = calls
        self._local = _thread._local()

    # -- policy ---------------------------------------------------------------

    def configure(self, table: str) -> None:
        offset = ctypes.c_size_t(0)
        try:
            encoded = table.encode("ascii")
        except UnicodeEncodeError as exc:
            # The grammar is ASCII; a table set by hand may not be.
            raise RuntimeLoadError(
                f"the table has a character the runtime cannot read at offset {exc.start}: {table!r}"
            ) from None
        status = self._lib.ap_configure(encoded, ctypes.byref(offset))
        if status == EFULL:
            raise RuntimeLoadError("the runtime's scope table is full (256 scopes at most)")
        if status != OK:
            raise RuntimeLoadError(
                f"the runtime rejected the compiled policy at offset {offset.value}: {table!r}"
            )

    def scope_id(self, name: str) -> int | None:
        out = ctypes.c_uint32()
        if self._lib.ap_scope_find(name.encode("utf-8"), ctypes.byref(out)) != OK:
            return None
        return out.value

    # -- scope stack ------------------------------------------------------------

    def enter(self, scope_id: int) -> int:
        out = ctypes.c_uint32()
        status = self._lib.ap_enter(scope_id, ctypes.byref(out))
        if status:
            check(status, "ap_enter", scope_id)
        return self._entered(out)

    def _entered(self, result):
        """``result.value``, read inside the instance just entered: if that
        is refused, the entry is undone before the MemoryError goes on."""
        try:
            return result.value
        except BaseException:
            self.exit()
            raise

    def exit(self) -> int:
        """Leave the innermost instance; :data:`EXIT_REGION` if it was of a
        forbid scope (its region record is then :meth:`region_last`).

        The C side allocates nothing, but the ctypes call itself may allocate a
        little while the scope is still innermost; if that allocation is
        refused, the refusal opens the scope's unwind grace and the retry runs
        within it.
        """
        try:
            return self._exit()
        except MemoryError:
            return self._exit()

    def enter_noting(self, scope_id: int) -> int:
        """:meth:`enter`, returning the thread's violation number from just
        before the entry (what a task boundary notes) instead of the instance."""
        status = self.enter_plain(scope_id)
        if status:
            check(status, "ap_enter", scope_id)
        try:
            return self.entry_seq()
        except BaseException:
            self.exit()  # as in _entered()
            raise

    def set_budget(self, instance: int, budget: int) -> None:
        """Give ``instance``, just entered on this thread, a budget of its own (0: none)."""
        check(self._lib.ap_set_budget(instance, budget), "ap_set_budget", instance, budget)

    def hold(self, instance: int) -> bool:
        return self._lib.ap_hold(instance) == OK

    def release(self, instance: int) -> None:
        self._lib.ap_release(instance)

    def attach(self, instance: int) -> None:
        check(self._lib.ap_attach(instance), "ap_attach", instance)

    def current(self) -> tuple[int, int]:
        inst, depth = ctypes.c_uint32(), ctypes.c_uint32()
        self._lib.ap_current(ctypes.byref(inst), ctypes.byref(depth))
        return inst.value, depth.value

    def flush(self) -> None:
        self._lib.ap_flush()

    # -- module-bound scopes on 3.12+ (native/src/pymonitor.c) ---------------------

    def monitoring_callbacks(self, classify, entry_failed, leave_raising, released, disable) -> dict[str, Any]:
        """The sys.monitoring callbacks of module-bound scopes, built-in
        functions of the library, after handing it the package's functions
        (their references are the caller's to keep). An instance is entered
        by the library itself, or by :meth:`monitoring_enter` where that
        needs Python (the in-process library's checks)."""
        lib = self._gil_lib
        if not hasattr(self, "_mon_bind"):
            lib.ap_mon_set.argtypes = [ctypes.POINTER(MonHooksC)]
            lib.ap_mon_set.restype = ctypes.c_int
            lib.ap_mon_bind.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
            lib.ap_mon_bind.restype = ctypes.c_int
            lib.ap_mon_clear.argtypes = []
            lib.ap_mon_clear.restype = None
            lib.ap_mon_inflight.argtypes = []
            lib.ap_mon_inflight.restype = ctypes.c_uint64
            lib.ap_mon_release_pending.argtypes = [ctypes.c_uint32]
            lib.ap_mon_release_pending.restype = None
            self._mon_bind = lib.ap_mon_bind
        enter = self.monitoring_enter
        hooks = MonHooksC(ctypes.sizeof(MonHooksC), id(classify), id(entry_failed), id(leave_raising),
                          id(released), id(disable), id(enter) if enter is not None else None)
        self._mon_keep = enter  # the library holds no reference
        check(lib.ap_mon_set(ctypes.byref(hooks)), "ap_mon_set")
        make = self._fastcalls.fastcall
        return {name: make("ap_mon_" + name) for name in ("start", "throw", "leave", "unwind")}

    #: Set by the in-process library: its entries take the checks of enter().
    monitoring_enter = None

    def monitoring_bind(self, code: object, scope_id: int) -> bool:
        """Bind the code object ``code`` (kept alive by the caller) to the
        scope; False when the library's table of bound code is full."""
        status = self._mon_bind(id(code), scope_id)
        if status == EFULL:
            return False
        check(status, "ap_mon_bind", scope_id)
        return True

    def monitoring_clear(self) -> None:
        self._gil_lib.ap_mon_clear()

    def monitoring_inflight(self) -> int:
        """Activations of bound code on every thread."""
        return self._gil_lib.ap_mon_inflight()

    def monitoring_release_pending(self, pending: bool) -> None:
        self._gil_lib.ap_mon_release_pending(int(pending))

    # -- violations and statistics --------------------------------------------------

    def last_violation(self) -> Violation:
        """The calling thread's last violation, in a per-thread buffer.

        The buffer is reused so reading it on a task's exit path allocates as
        little as possible while the task may still be at its budget.
        """
        local = self._local
        try:
            buf, ptr = local.violation
        except AttributeError:
            buf = _sized(Violation)
            ptr = ctypes.pointer(buf)
            local.violation = (buf, ptr)
        buf.size = ctypes.sizeof(Violation)
        self._lib.ap_last_violation(ptr)
        return buf

    def frame_reader(self):
        """ap_frame_here, ready to call: ``reader(byref(probe), byref(code),
        byref(instr))`` reads the frame that makes the call (through the
        handle that keeps the GIL)."""
        fn = self._gil_lib.ap_frame_here
        fn.argtypes = [ctypes.POINTER(FrameProbeC), ctypes.POINTER(ctypes.c_uint64),
                       ctypes.POINTER(ctypes.c_uint64)]
        fn.restype = ctypes.c_int
        return fn

    def set_frame_probe(self, probe: FrameProbeC | None) -> None:
        """Record where refusals are made in Python code (ap_set_frame_probe)."""
        check(
            self._lib.ap_set_frame_probe(None if probe is None else ctypes.byref(probe)),
            "ap_set_frame_probe",
        )

    def scope_stats(self, scope_id: int) -> ScopeStatsC | None:
        out = _sized(ScopeStatsC)
        if self._lib.ap_get_scope_stats(scope_id, ctypes.byref(out)) != OK:
            return None
        return out

    def instance_stats(self, instance: int) -> InstanceStatsC | None:
        out = _sized(InstanceStatsC)
        if self._lib.ap_get_instance_stats(instance, ctypes.byref(out)) != OK:
            return None
        return out

    def process_stats(self) -> ProcessStatsC:
        out = _sized(ProcessStatsC)
        self._lib.ap_get_process_stats(ctypes.byref(out))
        return out

    # -- reservations -----------------------------------------------------------------

    def reserve(self, nbytes: int, overdraft: int) -> Violation | None:
        """Make a reservation; ``None`` when granted, else the refusal."""
        refusal = _sized(Violation)
        status = self._lib.ap_reserve(nbytes, overdraft, ctypes.byref(refusal))
        if status == OK:
            return None
        if status == EREFUSED:
            return refusal
        check(status, "ap_reserve", nbytes)
        return None  # not reached: check() raised

    def unreserve(self) -> ReservationC | None:
        """Release the innermost reservation; ``None`` if there is none."""
        out = _sized(ReservationC)
        if self._lib.ap_unreserve(ctypes.byref(out)) != OK:
            return None
        return out

    def reservation(self) -> ReservationC | None:
        """The innermost reservation's record, ``None`` if there is none."""
        out = _sized(ReservationC)
        if self._lib.ap_reservation_get(ctypes.byref(out)) != OK:
            return None
        return out

    # -- regions, census, injection -----------------------------------------------------

    def _region_buffer(self) -> tuple[RegionC, Any]:
        # Made before a region opens and reused, so that closing one does not
        # itself allocate inside it.
        local = self._local
        try:
            return local.region
        except AttributeError:
            buf = _sized(RegionC)
            local.region = (buf, ctypes.pointer(buf))
            return local.region

    def region_enter(self, action: int, frees: bool, domains: int) -> None:
        self._region_buffer()
        check(self._lib.ap_region_enter(action, int(frees), domains), "ap_region_enter")

    def region_exit(self) -> RegionC | None:
        """Leave the innermost region; ``None`` if the innermost is not an API
        region. The record is returned as a copy, made after the region closed."""
        buf, ptr = self._region_buffer()
        buf.size = ctypes.sizeof(RegionC)
        if self._lib.ap_region_exit(ptr) != OK:
            return None
        return RegionC.from_buffer_copy(buf)

    def region_last(self) -> RegionC:
        out = _sized(RegionC)
        self._lib.ap_region_last(ctypes.byref(out))
        return out

    def census_open(self) -> None:
        self._lib.ap_census_open()

    def census_close(self) -> None:
        self._lib.ap_census_close()

    def census_read(self) -> CensusC:
        out = _sized(CensusC)
        self._lib.ap_census_read(ctypes.byref(out))
        return out

    def inject_set(self, config: InjectConfigC | None) -> None:
        if config is not None:
            config.size = ctypes.sizeof(InjectConfigC)
        status = self._lib.ap_inject_set(ctypes.byref(config) if config is not None else None)
        check(status, "ap_inject_set", failure="the runtime rejected the injection settings")

    def inject_stats(self) -> InjectStatsC:
        out = _sized(InjectStatsC)
        self._lib.ap_inject_get(ctypes.byref(out))
        return out

    # -- Python's small objects ------------------------------------------------------

    def lib_stats(self) -> list[LibStatsC]:
        """Every shared object seen allocating (ap_lib_get), then the entry
        for code in no loaded object (index :data:`LIB_UNKNOWN`)."""
        n = ctypes.c_uint32()
        self._lib.ap_libs_count(ctypes.byref(n))
        out = []
        for index in [*range(n.value), LIB_UNKNOWN]:
            stats = _sized(LibStatsC)
            if self._lib.ap_lib_get(index, ctypes.byref(stats)) == 0:
                out.append(stats)
        return out

    def libs_report(self, on: bool, fd: int = -1) -> None:
        """Count allocations per shared object; with ``fd`` >= 0, write the table there at exit."""
        if self._lib.ap_libs_report(int(on), fd) != 0:
            raise ValueError(f"fd: expected a file descriptor number or -1, got {fd}")

    def lib_find(self, address: int) -> int | None:
        """Index of the loaded object whose code holds ``address``, or ``None``."""
        index = ctypes.c_uint32()
        if self._lib.ap_lib_find(address, ctypes.byref(index)) != 0:
            return None
        return index.value

    def install_arena_hook(self) -> None:
        """Charge pymalloc arenas to scopes (see native/src/hooks_pyarena.c)."""
        api = ctypes.pythonapi
        get = ctypes.cast(api.PyObject_GetArenaAllocator, ctypes.c_void_p).value
        set_ = ctypes.cast(api.PyObject_SetArenaAllocator, ctypes.c_void_p).value
        # Called through a PyDLL handle: the GIL stays held, as Python requires.
        status = self._install_arena(get, set_)
        check(status, "ap_py_install_arena_hook", failure="installing the pymalloc arena hook failed")

    # -- Python's allocator domains (hooks_pymem.c) --------------------------------

    def install_domain_hooks(self, domains: int | None = None) -> None:
        """Show the requests of Python's MEM and OBJ domains to regions, the
        census and fault injection (observing layers, see hooks_pymem.c).

        Meant to be called the first time something watches Python's
        allocations, so that runs that never do pay nothing; calling it again
        is cheap and puts the layers back if another tool removed them.
        """
        fn = self._gil_lib.ap_py_install_domain_hooks
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32]
        fn.restype = ctypes.c_int
        get, set_ = _pymem_accessors()
        status = fn(get, set_, PYMEM_MEM_OBJ if domains is None else domains)
        check(
            status, "ap_py_install_domain_hooks",
            failure="installing the Python allocator observers failed",
        )


# `_thread`, not `threading`: this module is imported when every interpreter
# under `allocpolicy run` starts, and importing `threading` there changes what
# programs observe (CPython's own test_threading checks it is not imported).
_lock = _atfork.lock()
_runtime: Runtime | None = None
_probed = False
#: The runtime's entry and exit of a `with` block (Runtime.enter_marked and
#: exit_tagged), or None without a runtime: what a scope's fast path calls,
#: found with one lookup each (an attribute of the Runtime object costs
#: several times that on every entry and exit).
enter_marked = None
exit_tagged = None


def _set_runtime(rt: Runtime | None) -> None:
    global _runtime, enter_marked, exit_tagged
    _runtime = rt
    enter_marked = rt.enter_marked if rt is not None else None
    exit_tagged = rt.exit_tagged if rt is not None else None


def runtime() -> Runtime | None:
    """The preloaded runtime, or ``None`` when the library is not preloaded."""
    global _probed
    if _probed:
        return _runtime
    with _lock:
        if not _probed:
            _set_runtime(_load_preloaded())
            _probed = True
    return _runtime


def _load_preloaded() -> Runtime | None:
    main = ctypes.CDLL(None)
    try:
        main.ap_abi_version
    except AttributeError:
        return None
    rt = Runtime(main, ctypes.PyDLL(None), _preloaded_path())
    if not rt.preloaded:
        # Linked into the executable's namespace but not interposing (it was
        # dlopen()ed RTLD_GLOBAL by someone): it governs nothing.
        return None
    return rt


# -- In-process mode (allocpolicy.install(), see _inprocess.py) ------------------------
#
# Without the preload, install() loads a variant of the library built for
# dlopen() (general TLS model: a late dlopen() finds no room in the static TLS
# block), wraps Python's allocator domains and NumPy's data handler with it,
# and makes runtime() return it.

INPROCESS_LIBRARY_NAME = "liballocpolicy_inproc.so"

#: CPython's PyMemAllocatorDomain values.
PYMEM_RAW, PYMEM_MEM, PYMEM_OBJ = 0, 1, 2
PYMEM_DOMAIN_NAMES = ("RAW", "MEM", "OBJ")
PYMEM_MEM_OBJ = (1 << PYMEM_MEM) | (1 << PYMEM_OBJ)
#: ap_pyhook: what a layer over a domain does.
PYHOOK_OBSERVE, PYHOOK_ACCOUNT, PYHOOK_ACCOUNT_DEBUG = 1, 2, 3

# NumPy's C API table (numpy/_core/include/numpy/__multiarray_api.h); the
# indices are part of NumPy's ABI and do not change between releases.
_NPY_FEATURE_VERSION_INDEX = 211
_NPY_SET_HANDLER_INDEX = 304
_NPY_GET_HANDLER_INDEX = 305
_NPY_1_22_API_VERSION = 0x0F  # the first with PyDataMem_SetHandler (NEP 49)


class PyAllocatorC(ctypes.Structure):
    """CPython's PyMemAllocatorEx."""

    _fields_ = [
        ("ctx", ctypes.c_void_p),
        ("malloc", ctypes.c_void_p),
        ("calloc", ctypes.c_void_p),
        ("realloc", ctypes.c_void_p),
        ("free", ctypes.c_void_p),
    ]

    def key(self) -> tuple:
        return (self.ctx, self.malloc, self.calloc, self.realloc, self.free)


class ArenaAllocatorC(ctypes.Structure):
    """CPython's PyObjectArenaAllocator."""

    _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]

    def key(self) -> tuple:
        return (self.ctx, self.alloc, self.free)


_pyapi_handle: ctypes.PyDLL | None = None


def _pyapi() -> ctypes.PyDLL:
    """Python's C API through a handle of our own: setting argtypes on
    ``ctypes.pythonapi``'s shared function objects would change them for
    every other user of ctypes in the process."""
    global _pyapi_handle
    if _pyapi_handle is None:
        _pyapi_handle = ctypes.PyDLL(None)
    return _pyapi_handle


def _pymem_accessors() -> tuple[int, int]:
    api = ctypes.pythonapi
    return (
        ctypes.cast(api.PyMem_GetAllocator, ctypes.c_void_p).value,
        ctypes.cast(api.PyMem_SetAllocator, ctypes.c_void_p).value,
    )


def allocator_name() -> str | None:
    """CPython's name for the allocators in force ("pymalloc", "malloc",
    "pymalloc_debug", "malloc_debug"), or None when some domain has a hook
    (tracemalloc's, ours) or the interpreter does not say."""
    try:
        fn = _pyapi()._PyMem_GetCurrentAllocatorName
    except AttributeError:
        return None
    fn.argtypes = []
    fn.restype = ctypes.c_char_p
    name = fn()
    return name.decode("ascii") if name else None


def inprocess_library_path() -> str:
    """The in-process variant, next to the library :func:`library_path` finds."""
    path = os.path.join(os.path.dirname(library_path()), INPROCESS_LIBRARY_NAME)
    if not os.path.isfile(path):
        raise RuntimeLoadError(
            f"the allocpolicy in-process library {path} is missing (it is built and "
            f"installed next to {LIBRARY_NAME}); reinstall the package, or rebuild a "
            "checkout's with `make -C native`"
        )
    return path


class NumpyApi:
    """PyDataMem_GetHandler / PyDataMem_SetHandler of one NumPy, reached
    through its C API capsule (``_multiarray_umath._ARRAY_API``)."""

    def __init__(self, array_api_capsule: object) -> None:
        api = _pyapi()
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        table_addr = api.PyCapsule_GetPointer(array_api_capsule, None)
        if not table_addr:
            raise RuntimeLoadError("NumPy's _ARRAY_API capsule holds no table")
        table = ctypes.cast(table_addr, ctypes.POINTER(ctypes.c_void_p))
        feature = ctypes.CFUNCTYPE(ctypes.c_uint)(table[_NPY_FEATURE_VERSION_INDEX])()
        if feature < _NPY_1_22_API_VERSION:
            raise RuntimeLoadError(
                f"this NumPy (C API feature version {feature:#x}) has no data memory "
                "handlers; NumPy 1.22 or later is needed"
            )
        # PYFUNCTYPE: the GIL stays held and a Python error set by NumPy is raised.
        self._get = ctypes.PYFUNCTYPE(ctypes.py_object)(table[_NPY_GET_HANDLER_INDEX])
        self._set = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.py_object)(
            table[_NPY_SET_HANDLER_INDEX]
        )

    def get_handler(self) -> object:
        """The handler capsule in force in the calling context."""
        return self._get()

    def set_handler(self, capsule: object) -> object:
        """Make ``capsule`` the calling context's handler; returns the previous one."""
        return self._set(capsule)


class InprocessRuntime(Runtime):
    """The in-process variant of the library, loaded with dlopen()."""

    def __init__(self, path: str) -> None:
        handle = ctypes.CDLL(path)
        gil = ctypes.PyDLL(path)
        super().__init__(handle, gil, path)
        u32p = ctypes.POINTER(ctypes.c_uint32)
        voidp = ctypes.c_void_p
        sig = {
            "ap_py_enter": ([ctypes.c_uint32, u32p, u32p], ctypes.c_int),
            "ap_py_hook_domain": ([voidp, voidp, ctypes.c_uint32, ctypes.c_uint32], ctypes.c_int),
            "ap_py_unhook_domain": ([voidp, voidp, ctypes.c_uint32], ctypes.c_int),
            "ap_numpy_handler": (
                [voidp, ctypes.POINTER(voidp), ctypes.POINTER(ctypes.c_char_p)],
                ctypes.c_int,
            ),
            "ap_numpy_set_active": ([voidp, ctypes.c_uint32], ctypes.c_int),
            "ap_py_hooks_lost": ([], ctypes.c_uint32),
        }
        # All through the PyDLL handle: they call Python's allocator functions,
        # which require the GIL (ap_py_enter reads the allocators in force).
        for name, (argtypes, restype) in sig.items():
            fn = getattr(gil, name)
            fn.argtypes = argtypes
            fn.restype = restype
        self._py_enter = gil.ap_py_enter
        self._gil = gil
        self._pymem = _pymem_accessors()
        #: Called before every scope entry (and bind() attach) in the calling
        #: context, and with the mask of domains whose layer no longer sees
        #: requests when there are any; both set by _inprocess.install().
        self.before_enter = None
        self.settle = None
        # The entry of a boundary runs the checks of in-process mode too
        # (_enter_checked raises instead of returning a status).
        self.enter_marked = self._enter_checked
        self.enter_plain = self._enter_checked_plain
        self._mark_innermost = self._fastcalls.make("ap_mark_innermost", "s_o")
        self.monitoring_enter = self.enter

    # -- scope entry: the same as Runtime's, plus the checks of in-process mode -----

    def enter(self, scope_id: int) -> int:
        # Before entering: what these checks allocate belongs to the outer scope.
        before = self.before_enter
        if before is not None:
            before()
        out, lost = ctypes.c_uint32(), ctypes.c_uint32()
        status = self._py_enter(scope_id, ctypes.byref(out), ctypes.byref(lost))
        if status == ESTATE and lost.value:
            settle = self.settle
            if settle is not None:
                settle(lost.value)
            # Enter whatever settle() managed: a domain it could not put back
            # has been reported and must not block every entry.
            status = self._lib.ap_enter(scope_id, ctypes.byref(out))
        if status:
            check(status, "ap_enter", scope_id)
        return self._entered(out)

    def _enter_checked_plain(self, scope_id: int) -> int:
        self.enter(scope_id)
        return OK

    def _enter_checked(self, scope_id: int, tag: int) -> int:
        self.enter(scope_id)
        try:
            self._mark_innermost(tag)
        except BaseException:
            self.exit()  # its argument refused inside the new instance
            raise
        return OK

    def attach(self, instance: int) -> None:
        before = self.before_enter
        if before is not None:
            before()
        super().attach(instance)

    # -- Python's allocator domains ---------------------------------------------------

    @staticmethod
    def pymem_allocator(domain: int) -> PyAllocatorC:
        out = PyAllocatorC()
        fn = _pyapi().PyMem_GetAllocator
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(PyAllocatorC)]
        fn.restype = None
        fn(domain, ctypes.byref(out))
        return out

    def hook_domain(self, domain: int, how: int) -> int:
        """ap_py_hook_domain's status (OK, ESTATE for a layout that does not match)."""
        get, set_ = self._pymem
        return self._gil.ap_py_hook_domain(get, set_, domain, how)

    def hooks_lost(self) -> int:
        """Mask of the domains whose layer no longer sees requests (ap_py_hooks_lost)."""
        return self._gil.ap_py_hooks_lost()

    def unhook_domain(self, domain: int) -> int:
        get, set_ = self._pymem
        return self._gil.ap_py_unhook_domain(get, set_, domain)

    # -- pymalloc's arena allocator ------------------------------------------------------

    @staticmethod
    def arena_allocator() -> ArenaAllocatorC:
        out = ArenaAllocatorC()
        fn = _pyapi().PyObject_GetArenaAllocator
        fn.argtypes = [ctypes.POINTER(ArenaAllocatorC)]
        fn.restype = None
        fn(ctypes.byref(out))
        return out

    @staticmethod
    def set_arena_allocator(allocator: ArenaAllocatorC) -> None:
        fn = _pyapi().PyObject_SetArenaAllocator
        fn.argtypes = [ctypes.POINTER(ArenaAllocatorC)]
        fn.restype = None
        fn(ctypes.byref(allocator))

    # -- NumPy's data handler -------------------------------------------------------------

    def numpy_capsule(self, previous: object) -> object:
        """A handler capsule that charges array data and allocates through the
        handler of the capsule ``previous``."""
        api = _pyapi()
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        prev = api.PyCapsule_GetPointer(previous, b"mem_handler")
        handler, name = ctypes.c_void_p(), ctypes.c_char_p()
        status = self._gil.ap_numpy_handler(prev, ctypes.byref(handler), ctypes.byref(name))
        check(status, "ap_numpy_handler", failure="making the NumPy data handler failed")
        new = api.PyCapsule_New
        # The name is the library's static string: the capsule may outlive
        # every Python object of ours (arrays keep it until they die).
        new.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        new.restype = ctypes.py_object
        return new(handler.value, ctypes.cast(name, ctypes.c_void_p).value, None)

    def numpy_set_active(self, capsule: object, active: bool) -> None:
        api = _pyapi()
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        self._gil.ap_numpy_set_active(api.PyCapsule_GetPointer(capsule, b"mem_handler"), int(active))


def load_inprocess() -> InprocessRuntime:
    """Load the in-process variant (once per process; the library is never unloaded)."""
    global _inprocess
    with _lock:
        if _inprocess is None:
            path = inprocess_library_path()
            try:
                _inprocess = InprocessRuntime(path)
            except OSError as err:
                if isinstance(err, RuntimeLoadError):
                    raise
                raise RuntimeLoadError(f"cannot load the in-process library {path}: {err}") from err
        return _inprocess


_inprocess: InprocessRuntime | None = None


def use_runtime(rt: Runtime | None) -> None:
    """Make :func:`runtime` return ``rt`` (in-process mode), or None again."""
    global _probed
    runtime()  # settle the preload probe first, so it cannot overwrite this
    with _lock:
        _set_runtime(rt)
        _probed = True

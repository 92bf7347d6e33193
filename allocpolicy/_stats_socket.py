"""A process's counters, readable from outside: the stats socket.

Only when asked (``allocpolicy run --stats-socket``, ``ALLOCPOLICY_STATS_SOCKET``
in the environment, or :func:`serve_stats`), a Python process under the
runtime listens on a Unix socket; whoever connects gets one JSON document
(:meth:`Stats.as_dict` plus ``pid`` and ``argv``) and the connection closes.
``allocpolicy stats PID`` is the client.

Addresses: ``@NAME`` is a Linux abstract socket (no file, gone with the
process, nothing to clean up), anything else a path. ``{pid}`` in either is
replaced by the process id, so that every process of a tree (workers a server
forks, a program's Python subprocesses, which inherit the environment) gets
its own. The default is :data:`DEFAULT_ADDRESS`.

Only the process's own user and root are served (the peer's credentials are
checked on every connection), and the listening thread is started only when
asked: without the setting, nothing here runs.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import struct
import sys
import threading
import warnings

from . import _atfork
from ._errors import AllocPolicyWarning

__all__ = [
    "ENV_STATS_SOCKET",
    "DEFAULT_ADDRESS",
    "serve_stats",
    "start_from_environment",
    "address_for",
    "read_stats",
    "listening_pids",
    "StatsUnavailable",
]

ENV_STATS_SOCKET = "ALLOCPOLICY_STATS_SOCKET"
#: Where a process serves its stats unless told otherwise.
DEFAULT_ADDRESS = "@allocpolicy-stats-{pid}"
_DEFAULT_PREFIX = "allocpolicy-stats-"
_ON = ("1", "on", "yes", "true")
_MAX_DOCUMENT = 64 << 20  # 256 scopes take a few hundred KiB; anything this big is not ours
_SEND_TIMEOUT = 5.0  # a client that connects and never reads must not hold the thread

_lock = _atfork.lock()
_server: _Server | None = None


class StatsUnavailable(Exception):
    """No stats could be read at an address; the message says why."""


def address_for(template: str, pid: int) -> str:
    """The address ``template`` (a value of the setting) names for process ``pid``."""
    if template.strip().lower() in _ON:
        template = DEFAULT_ADDRESS
    return template.replace("{pid}", str(pid))


def _sockaddr(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


class _Server:
    def __init__(self, template: str) -> None:
        self.template = template
        self.address = address_for(template, os.getpid())
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._bind()
            self.sock.listen(8)
        except BaseException:
            self.sock.close()
            raise
        self.pid = os.getpid()
        if not self.address.startswith("@"):
            # A path outlives the process unless removed; a forked child that
            # exits normally runs this too, hence the pid.
            atexit.register(self._unlink)
        self.thread = threading.Thread(target=self._loop, name="allocpolicy-stats", daemon=True)
        self.thread.start()

    def _bind(self) -> None:
        where = _sockaddr(self.address)
        if not self.address.startswith("@") and os.path.exists(where):
            # A socket file left by a process that died is reused; one that
            # answers belongs to a live process and is not taken from it.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(where)
            except ConnectionRefusedError:
                os.unlink(where)
            except OSError:
                pass
            else:
                raise OSError(f"{self.address} is in use by another process")
            finally:
                probe.close()
        old = os.umask(0o077)  # the file, if any, is its owner's only
        try:
            self.sock.bind(where)
        finally:
            os.umask(old)

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed (stop(), or the child of a fork)
            try:
                with conn:
                    conn.settimeout(_SEND_TIMEOUT)
                    conn.sendall(_document(conn))
            except Exception:
                # A client that went away, or a process at its budget: the
                # next connection gets another chance.
                pass

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._unlink()
        atexit.unregister(self._unlink)

    def _unlink(self) -> None:
        if not self.address.startswith("@") and os.getpid() == self.pid:
            try:
                os.unlink(self.address)
            except OSError:
                pass


def _peer_allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


def _document(conn: socket.socket) -> bytes:
    if not _peer_allowed(conn):
        doc: dict = {"error": f"process {os.getpid()} serves its stats only to its own user and root"}
    else:
        from ._stats import stats

        doc = stats().as_dict()
        doc["pid"] = os.getpid()
        doc["argv"] = list(getattr(sys, "orig_argv", None) or getattr(sys, "argv", []))
    return json.dumps(doc).encode() + b"\n"


def serve_stats(address: str | None = None) -> str:
    """Serve this process's :func:`stats` on a Unix socket, for ``allocpolicy stats PID``.

    ``address`` is ``@NAME`` (a Linux abstract socket) or a path; ``{pid}`` in
    it is replaced by the process id. The default, ``@allocpolicy-stats-{pid}``,
    is where ``allocpolicy stats PID`` looks. A daemon thread answers each
    connection of the process's own user or root with the JSON of
    :meth:`Stats.as_dict` and closes it. A process that forks serves again in
    the child, at the child's address, when the address contains ``{pid}``.
    ``allocpolicy run --stats-socket`` (``ALLOCPOLICY_STATS_SOCKET``) calls
    this at start-up. Calling it again moves the socket to the new address.
    Returns the address served.

    Raises:
        OSError: the address cannot be bound (for a path: its directory is
            missing, or a live process serves there).
        TypeError: ``address`` is not a ``str``.
    """
    global _server
    if address is not None and not isinstance(address, str):
        raise TypeError(f"serve_stats(): argument 'address' must be str, not {type(address).__name__}")
    with _lock:
        _watch_forks()
        server = _Server(address or DEFAULT_ADDRESS)
        if _server is not None:
            _server.stop()
        _server = server
        return server.address


_forks_watched = False


def _watch_forks() -> None:
    global _forks_watched
    if not _forks_watched:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _forks_watched = True


def _after_fork_in_child() -> None:
    # The thread did not survive the fork, and the socket is the parent's
    # (the lock is free again: _atfork re-initialised it).
    global _server
    server, _server = _server, None
    if server is None:
        return
    server.sock.close()  # closing our copy leaves the parent's socket open
    if "{pid}" in server.template or server.template.strip().lower() in _ON:
        try:
            _server = _Server(server.template)
        except OSError:
            pass


def start_from_environment() -> None:
    """At start-up under the runtime: serve when ``ALLOCPOLICY_STATS_SOCKET`` asks."""
    template = os.environ.get(ENV_STATS_SOCKET, "")
    if not template.strip():
        return
    try:
        serve_stats(DEFAULT_ADDRESS if template.strip().lower() in _ON else template)
    except OSError as exc:
        warnings.warn(
            f"{ENV_STATS_SOCKET}={template}: cannot serve the stats of process {os.getpid()}: {exc}",
            AllocPolicyWarning,
            stacklevel=2,
        )


# --- the client side ---------------------------------------------------------------


def read_stats(address: str) -> dict:
    """The document served at ``address``.

    Raises:
        StatsUnavailable: nothing serves there, or what answers is not a stats socket.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(_SEND_TIMEOUT)
    try:
        try:
            sock.connect(_sockaddr(address))
        except (FileNotFoundError, ConnectionRefusedError):
            raise StatsUnavailable(f"nothing serves stats at {address}") from None
        except PermissionError:
            raise StatsUnavailable(f"no permission to connect to {address}") from None
        chunks = []
        size = 0
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            size += len(chunk)
            if size > _MAX_DOCUMENT:
                raise StatsUnavailable(f"{address} sent more than {_MAX_DOCUMENT} bytes: not a stats socket")
            chunks.append(chunk)
    except socket.timeout:
        raise StatsUnavailable(f"{address} did not answer within {_SEND_TIMEOUT:g} s") from None
    except OSError as exc:
        raise StatsUnavailable(f"{address}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError:
        raise StatsUnavailable(f"{address} did not answer with a stats document") from None
    if not isinstance(doc, dict):
        raise StatsUnavailable(f"{address} did not answer with a stats document")
    if "error" in doc:
        raise StatsUnavailable(str(doc["error"]))
    return doc


def listening_pids() -> list[int]:
    """Processes serving at the default address (from ``/proc/net/unix``), sorted."""
    pids = set()
    try:
        with open("/proc/net/unix", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                path = parts[7] if len(parts) >= 8 else ""
                if path.startswith("@" + _DEFAULT_PREFIX):
                    tail = path[len(_DEFAULT_PREFIX) + 1 :]
                    if tail.isdigit() and os.path.exists(f"/proc/{tail}"):
                        pids.add(int(tail))
    except OSError:
        pass
    return sorted(pids)

"""``allocpolicy stats``: read another process's counters and say why when it cannot."""

from __future__ import annotations

import json
import os

from ._stats import Stats
from ._stats_socket import DEFAULT_ADDRESS, ENV_STATS_SOCKET, StatsUnavailable, address_for, listening_pids, read_stats

__all__ = ["fetch", "render", "listing", "StatsUnavailable"]

_ASK = f"start it with `allocpolicy run --stats-socket` (or {ENV_STATS_SOCKET}=1 in its environment)"


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode("utf-8", "replace") for a in argv if a) or "?"


def _environment_setting(pid: int) -> str | None:
    """The process's ALLOCPOLICY_STATS_SOCKET as it started; "" when unset;
    None when its environment cannot be read (another user's process)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    prefix = ENV_STATS_SOCKET.encode() + b"="
    for entry in entries:
        if entry.startswith(prefix):
            return entry[len(prefix) :].decode("utf-8", "replace")
    return ""


def _runs_the_runtime(pid: int) -> bool | None:
    """Whether the runtime library is mapped into ``pid``; None if that cannot be read."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            return any("liballocpolicy" in line for line in f)
    except OSError:
        return None


def _owner(pid: int) -> int | None:
    """The user id ``pid`` runs as; None if it is gone."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _other_network_namespace(pid: int) -> bool:
    """Whether ``pid`` is in a network namespace other than ours (False if unknown)."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def fetch(pid: int | None, address: str | None) -> dict:
    """The stats document of process ``pid`` or at ``address``.

    Raises:
        StatsUnavailable: with the reason, and what to do about it.
    """
    if address is not None:
        return read_stats(address)
    assert pid is not None
    if not os.path.exists(f"/proc/{pid}"):
        raise StatsUnavailable(f"no process {pid}")
    who = f"process {pid} ({_command(pid)})"
    setting = _environment_setting(pid)
    address = address_for(setting or DEFAULT_ADDRESS, pid)
    try:
        return read_stats(address)
    except StatsUnavailable as exc:
        if "only to its own user" in str(exc):
            raise
        raise StatsUnavailable(_why_not(pid, who, setting, address, exc)) from None


def _why_not(pid: int, who: str, setting: str | None, address: str, exc: StatsUnavailable) -> str:
    """What to tell the user when ``pid`` did not answer at ``address``."""
    runs = _runs_the_runtime(pid)
    if runs is False:
        return f"{who} does not run under allocpolicy"
    if address.startswith("@") and _other_network_namespace(pid):
        return (
            f"{who} runs in another network namespace (a container?), which abstract sockets do not "
            f"leave: run `nsenter -t {pid} -n allocpolicy stats {pid}`, or have it serve at a path "
            f"both can see ({ENV_STATS_SOCKET}=/shared/dir/stats-{{pid}}.sock) and use --socket"
        )
    if setting:
        return (
            f"{who} was asked to serve its stats at {address} ({ENV_STATS_SOCKET}={setting}), "
            f"but {exc} (only Python programs serve them, from when allocpolicy is imported)"
        )
    if runs is None:
        owner = _owner(pid)
        if owner is not None and owner != os.geteuid() and os.geteuid() != 0:
            return (
                f"{who} serves no stats at {address}; it belongs to another user, so whether it runs "
                "under allocpolicy cannot be seen: run this as that user or root"
            )
        return (
            f"{who} serves no stats at {address}; its memory map cannot be read (the kernel "
            "protects it), so whether it runs under allocpolicy cannot be seen"
        )
    return f"{who} runs under allocpolicy but does not serve its stats: {_ASK}"


def render(doc: dict, shape: str) -> str:
    """``doc`` as ``"json"``, ``"prometheus"`` text or a ``"table"`` (with a title line)."""
    if shape == "json":
        return json.dumps(doc, indent=2) + "\n"
    try:
        stats = Stats.from_dict(doc)
    except ValueError as exc:
        raise StatsUnavailable(str(exc)) from None
    if shape == "prometheus":
        from .metrics import prometheus_text

        return prometheus_text(stats)
    argv = " ".join(doc.get("argv") or []) or "?"
    return f"process {doc.get('pid', '?')}: {argv}\n{stats.format()}\n"


def listing(as_json: bool = False) -> str:
    """The processes serving their stats at the default address, one a line."""
    pids = listening_pids()
    if as_json:
        return json.dumps([{"pid": pid, "command": _command(pid)} for pid in pids], indent=2)
    if not pids:
        return f"no process serves its stats at the default address ({_ASK})"
    return "\n".join([f"{'PID':>7}  COMMAND"] + [f"{pid:>7}  {_command(pid)}" for pid in pids])

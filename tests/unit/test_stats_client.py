"""What `allocpolicy stats PID` says when a process's memory map cannot be read."""

from __future__ import annotations

import pytest

from allocpolicy import _stats_client
from allocpolicy._stats_socket import StatsUnavailable


@pytest.fixture
def unreadable(monkeypatch):
    """A process whose memory map and environment cannot be read, owned by ``owner``."""
    monkeypatch.setattr(_stats_client, "_runs_the_runtime", lambda pid: None)
    monkeypatch.setattr(_stats_client, "_other_network_namespace", lambda pid: False)

    def owned_by(owner: int, me: int) -> str:
        monkeypatch.setattr(_stats_client, "_owner", lambda pid: owner)
        monkeypatch.setattr(_stats_client.os, "geteuid", lambda: me)
        return _stats_client._why_not(4242, "process 4242 (x)", None, "@allocpolicy-stats-4242",
                                      StatsUnavailable("nothing serves stats at @allocpolicy-stats-4242"))

    return owned_by


def test_another_users_process_is_called_so(unreadable):
    assert unreadable(owner=1000, me=1001) == (
        "process 4242 (x) serves no stats at @allocpolicy-stats-4242; it belongs to another user, "
        "so whether it runs under allocpolicy cannot be seen: run this as that user or root"
    )


@pytest.mark.parametrize("owner, me", [(0, 0), (1000, 1000), (1000, 0)])
def test_a_protected_process_of_our_own_or_read_by_root_is_not_called_another_users(unreadable, owner, me):
    # root reading a process the kernel protects (pid 1 in a sandbox, one not
    # dumpable), or our own such process: "run this as that user or root" would not help
    said = unreadable(owner=owner, me=me)
    assert said == (
        "process 4242 (x) serves no stats at @allocpolicy-stats-4242; its memory map cannot be read "
        "(the kernel protects it), so whether it runs under allocpolicy cannot be seen"
    )

"""The reading of the machine's memory limits, on the fake machines of
tests/data/machine (the runtime's own reading is tested on the same trees in
tests/integration/test_machine_headroom.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from allocpolicy import machine_headroom
from allocpolicy._policy import memory_limit

CORPUS = Path(__file__).resolve().parents[1] / "data" / "machine"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())


def roots(case: str) -> dict[str, str]:
    root = CORPUS / case / "root"
    return {"proc_root": str(root / "proc"), "cgroup_root": str(root / "sys" / "fs" / "cgroup")}


def expected(case: str) -> dict:
    return json.loads((CORPUS / case / "expected.json").read_text(encoding="utf-8"))


def source_matches(found: str, want: str) -> bool:
    return want in found if want in ("MemTotal", "MemAvailable") else f"/root/{want}" in found


def test_the_corpus_covers_every_kind_of_hierarchy():
    assert {"v2_leaf", "hybrid_unified", "hybrid_v1_memory", "v1_docker", "v1_no_namespace", "no_cgroup"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_limit_for_percentages(case):
    want = expected(case)
    total, basis = memory_limit(**roots(case))
    assert total == want["limit"], want["about"]
    assert source_matches(basis, want["limit_source"]), basis


@pytest.mark.parametrize("case", CASES)
def test_headroom_for_reservations(case):
    want = expected(case)
    room, source = machine_headroom(**roots(case))
    assert room == want["headroom"], want["about"]
    assert source_matches(source, want["headroom_source"]), source


def test_nothing_readable(tmp_path):
    nothing = {"proc_root": str(tmp_path), "cgroup_root": str(tmp_path)}
    assert machine_headroom(**nothing) == (1 << 62, "unknown")
    with pytest.raises(OSError, match="cannot tell how much memory is available"):
        memory_limit(**nothing)


def test_the_machine_root_stands_for_slash(monkeypatch):
    # The runtime's reading takes the same root (tests/integration/test_machine_headroom.py).
    want = expected("v1_docker")
    monkeypatch.setenv("ALLOCPOLICY_MACHINE_ROOT", str(CORPUS / "v1_docker" / "root"))
    assert machine_headroom()[0] == want["headroom"]
    assert memory_limit()[0] == want["limit"]

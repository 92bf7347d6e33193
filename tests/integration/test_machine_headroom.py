"""The runtime's own reading of the machine (native/src/machine.c), which
reservations check, on the fake machines of tests/data/machine: it must find
the headroom the Python reading finds (tests/unit/test_machine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runtime_run import check, run_python

CORPUS = Path(__file__).resolve().parents[1] / "data" / "machine"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())

# No margin: a reservation may take the whole headroom, and the refusal's
# `budget` is exactly the headroom the runtime read.
NO_MARGIN = """
    version = 1
    [process]
    reserve_margin = 0
"""

PROBE = """
    import json, sys, allocpolicy
    headroom = int(sys.argv[1])
    over = allocpolicy.try_reserve(headroom + 1)
    fits = allocpolicy.try_reserve(headroom)
    print(json.dumps([type(over).__name__, over.reason, over.limit, over.budget, type(fits).__name__]))
"""


@pytest.mark.parametrize("case", CASES)
def test_reservations_see_the_headroom_of_every_kind_of_cgroup(case, tmp_path):
    expected = json.loads((CORPUS / case / "expected.json").read_text(encoding="utf-8"))
    headroom = expected["headroom"]
    # GIVEN the runtime reading the fake machine instead of / (the test root)
    env = {"ALLOCPOLICY_MACHINE_ROOT": str(CORPUS / case / "root")}
    # WHEN a reservation asks for one byte more than the headroom, then for all of it
    out = check(run_python(PROBE, NO_MARGIN, tmp_path, args=(str(headroom),), env=env))
    # THEN the first is refused by the machine with the headroom as its budget
    # (a budget of 0 comes to Python as None, as everywhere), the second granted
    budget = headroom or None
    assert json.loads(out) == ["AllocError", "oom", "machine", budget, "Reservation"], expected["about"]

"""The pytest plugin, run as users run it: pytest in a child process under
``allocpolicy run``, on small test files written for each case.

The child loads the plugin by module (``-p allocpolicy.pytest_plugin``, with
the entry point's name blocked so an installed copy does not load twice); that
the ``pytest11`` entry point registers it is checked on its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import allocpolicy

PACKAGE_ROOT = str(Path(allocpolicy.__file__).resolve().parents[1])
REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "oom_sweep_demo"
TIMEOUT = 300
LOAD_PLUGIN = ("-p", "no:allocpolicy", "-p", "allocpolicy.pytest_plugin")
HOW_TO_RUN = "run pytest under the runtime: `allocpolicy run -- python -m pytest ...`"


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LD_PRELOAD", "PYTHONMALLOC", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")
        and (not k.startswith("ALLOCPOLICY_") or k == "ALLOCPOLICY_LIBRARY")
    }
    # The package these tests imported, also in the child.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["COLUMNS"] = "300"  # summary lines in full
    env.update(extra or {})
    return env


def pytest_in(
    where: Path,
    *args: str,
    preload: bool = True,
    plugin: tuple[str, ...] = LOAD_PLUGIN,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``[allocpolicy run --] python -m pytest ARGS`` in directory ``where``."""
    cmd = [sys.executable, "-m", "pytest", *plugin, "-p", "no:cacheprovider", *args]
    if preload:
        cmd = [sys.executable, "-m", "allocpolicy", "run", "--", *cmd]
    return subprocess.run(
        cmd, cwd=str(where), env=_env(env), capture_output=True, text=True, timeout=TIMEOUT
    )


def write(tmp_path: Path, name: str, text: str, ini: str = "") -> Path:
    (tmp_path / "pytest.ini").write_text("[pytest]\n" + textwrap.dedent(ini))
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def outcome(proc: subprocess.CompletedProcess) -> str:
    """The summary line, e.g. '1 failed, 2 passed'."""
    last = proc.stdout.strip().splitlines()[-1]
    return re.sub(r"^=+ | in [0-9.]+s.*$", "", last).strip()


# --- registration ---------------------------------------------------------------------


def test_markers_and_options_are_documented(tmp_path):
    write(tmp_path, "test_nothing.py", "def test_nothing(): pass\n")
    markers = pytest_in(tmp_path, "--markers", preload=False)
    assert markers.returncode == 0, explain(markers)
    for text in (
        "@pytest.mark.alloc_budget(size, threads='current'):",
        "@pytest.mark.no_alloc(frees=False, domains=None):",
        "@pytest.mark.oom_sweep(max_runs=None, stride=1, time_budget=None, persistent=False",
    ):
        assert text in markers.stdout, explain(markers)
    helped = pytest_in(tmp_path, "--help", preload=False)
    assert helped.returncode == 0, explain(helped)
    for option in ("--alloc-budget=SIZE", "--alloc-budget-threads", "--oom-sweep ", "--oom-sweep-max-runs=N",
                   "--oom-sweep-stride=K", "--oom-sweep-time=SECONDS", "--oom-replay=INDEX",
                   "alloc_budget (string):", "allocpolicy_unavailable (string):"):
        assert option in helped.stdout, option


def _entry_point_installed() -> bool:
    try:
        eps = metadata.distribution("allocpolicy").entry_points
    except metadata.PackageNotFoundError:
        return False
    return any(ep.group == "pytest11" and ep.value == "allocpolicy.pytest_plugin" for ep in eps)


@pytest.mark.skipif(
    not _entry_point_installed(),
    reason="the installed allocpolicy distribution predates its pytest11 entry point; "
    "reinstall it (pip install .) to check the registration",
)
def test_the_entry_point_loads_the_plugin_without_being_asked(tmp_path):
    write(tmp_path, "test_nothing.py", "def test_nothing(): pass\n")
    proc = pytest_in(tmp_path, "--markers", preload=False, plugin=())
    assert proc.returncode == 0, explain(proc)
    assert "@pytest.mark.oom_sweep(" in proc.stdout
    # ... and -p no:allocpolicy turns it off.
    off = pytest_in(tmp_path, "--markers", preload=False, plugin=("-p", "no:allocpolicy"))
    assert "@pytest.mark.oom_sweep(" not in off.stdout


# --- without the runtime -------------------------------------------------------------------


MARKED = """
    import pytest

    @pytest.mark.alloc_budget("1 MiB")
    def test_budgeted():
        pass

    def test_plain():
        pass
"""


def test_without_the_runtime_marked_tests_are_skipped_and_say_why(tmp_path):
    write(tmp_path, "test_marked.py", MARKED)
    proc = pytest_in(tmp_path, "-rs", preload=False)
    assert proc.returncode == 0, explain(proc)
    assert outcome(proc) == "1 passed, 1 skipped"
    assert f"needs the allocpolicy runtime, which is not preloaded; {HOW_TO_RUN}" in proc.stdout


def test_without_the_runtime_the_ini_can_make_them_fail(tmp_path):
    write(tmp_path, "test_marked.py", MARKED, ini="allocpolicy_unavailable = fail\n")
    proc = pytest_in(tmp_path, "-rE", preload=False)
    assert proc.returncode == 1, explain(proc)
    # Failing in setup is an error, in pytest's words.
    assert outcome(proc) == "1 passed, 1 error"
    assert f"ERROR test_marked.py::test_budgeted - Failed: needs the allocpolicy runtime, which is not " \
           f"preloaded; {HOW_TO_RUN}" in proc.stdout, explain(proc)


def test_without_the_runtime_the_options_refuse_to_start(tmp_path):
    write(tmp_path, "test_marked.py", MARKED)
    proc = pytest_in(tmp_path, "--oom-sweep", preload=False)
    assert proc.returncode == 4, explain(proc)  # pytest's usage error
    assert f"--oom-sweep needs the allocpolicy runtime, which is not preloaded; {HOW_TO_RUN}" in proc.stderr


# --- budgets ---------------------------------------------------------------------------------


BUDGET = """
    import pytest

    @pytest.mark.alloc_budget("8 MiB")
    def test_over_budget():
        small = bytearray(2 << 20)
        big = bytearray(16 << 20)
        del small, big

    @pytest.mark.alloc_budget("8 MiB")
    def test_within_budget():
        for _ in range(20):
            block = bytearray(4 << 20)
            del block
"""


def test_alloc_budget_fails_the_test_at_the_allocation_that_crossed_it(tmp_path):
    # GIVEN a test with an 8 MiB budget that holds 2 MiB and asks for 16 MiB more
    path = write(tmp_path, "test_budget.py", BUDGET)
    # WHEN it runs under the plugin
    proc = pytest_in(tmp_path, "-p", "no:randomly")
    # THEN it fails with AllocError at that allocation; the other test, which
    # allocates 80 MiB in all but never holds more than 4 MiB, passes
    assert proc.returncode == 1, explain(proc)
    assert outcome(proc) == "1 failed, 1 passed", explain(proc)
    line = path.read_text().splitlines().index("    big = bytearray(16 << 20)") + 1
    out = proc.stdout
    assert ">       big = bytearray(16 << 20)" in out, explain(proc)
    assert (
        "E       allocpolicy._errors.AllocError: allocation of 16777217 bytes refused in scope "
        "'pytest': over its budget of 8388608 bytes" in out
    ), explain(proc)
    assert f"test_budget.py:{line}: AllocError" in out, explain(proc)


DEFAULTS = """
    import pytest

    def test_default():
        block = bytearray(8 << 20)

    @pytest.mark.alloc_budget("32 MiB")
    def test_marker_raises_it():
        block = bytearray(8 << 20)

    @pytest.mark.alloc_budget(None)
    def test_marker_lifts_it():
        block = bytearray(64 << 20)
"""


def test_default_budget_from_the_ini_or_the_command_line_and_markers_override_it(tmp_path):
    write(tmp_path, "test_defaults.py", DEFAULTS, ini="alloc_budget = 4 MiB\n")
    proc = pytest_in(tmp_path, "-rf")
    assert outcome(proc) == "1 failed, 2 passed", explain(proc)
    assert "FAILED test_defaults.py::test_default - allocpolicy._errors.AllocError" in proc.stdout
    # The command line wins over the ini file.
    proc = pytest_in(tmp_path, "--alloc-budget", "16 MiB")
    assert outcome(proc) == "3 passed", explain(proc)
    # Without the runtime, the ini file's default is not enforced, and says so
    # once; only the test whose marker asks for a budget is skipped.
    proc = pytest_in(tmp_path, preload=False)
    assert outcome(proc) == "2 passed, 1 skipped, 1 warning", explain(proc)
    assert "PytestConfigWarning: the alloc_budget ini value (4 MiB) is not enforced" in proc.stdout


THREADS = """
    import threading
    import pytest

    def allocate_in_another_thread(size):
        outcome = []
        def work():
            try:
                block = bytearray(size)
                outcome.append("allocated")
            except MemoryError:
                outcome.append("refused")
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        return outcome[0]

    @pytest.mark.alloc_budget("16 MiB", threads="all")
    def test_all_threads_are_bounded():
        assert allocate_in_another_thread(64 << 20) == "refused"
        assert allocate_in_another_thread(1 << 20) == "allocated"

    @pytest.mark.alloc_budget("16 MiB")
    def test_other_threads_are_not_bounded_by_default():
        assert allocate_in_another_thread(64 << 20) == "allocated"
"""


def test_threads_all_bounds_what_other_threads_allocate(tmp_path):
    write(tmp_path, "test_threads.py", THREADS)
    proc = pytest_in(tmp_path)
    assert outcome(proc) == "2 passed", explain(proc)


# --- no_alloc and the statistics -----------------------------------------------------------------


NO_ALLOC = """
    import pytest

    DATA = bytearray(100_000)

    @pytest.mark.no_alloc
    def test_marked_body_allocates():
        copy = bytes(DATA)

    @pytest.mark.no_alloc
    def test_marked_body_does_not_allocate():
        assert DATA[10] == 0

    def test_region_allocates(no_alloc):
        prepared = bytearray(50_000)
        with no_alloc():
            prepared[:] = bytes(50_000)

    def test_region_does_not_allocate(no_alloc):
        prepared = bytearray(50_000)
        with no_alloc():
            prepared[0] = 7
        assert prepared[0] == 7

    def test_stats(alloc_stats):
        before = alloc_stats.live
        block = bytearray(3 << 20)
        assert alloc_stats.live - before >= 3 << 20
        assert alloc_stats.count >= 1
        del block
        assert alloc_stats.live - before < 3 << 20
        assert alloc_stats.peak - before >= 3 << 20
"""


def test_no_alloc_marker_and_fixture_and_the_stats_fixture(tmp_path):
    path = write(tmp_path, "test_no_alloc.py", NO_ALLOC)
    proc = pytest_in(tmp_path, "-rA")
    assert outcome(proc) == "2 failed, 3 passed", explain(proc)
    out = proc.stdout
    source = path.read_text().splitlines()
    for name, line in (("test_marked_body_allocates", "    copy = bytes(DATA)"),
                       ("test_region_allocates", "        prepared[:] = bytes(50_000)")):
        assert f"FAILED test_no_alloc.py::{name} - allocpolicy._errors.AllocError" in out, explain(proc)
        # The traceback stops at the allocation the region forbade.
        assert f"test_no_alloc.py:{source.index(line) + 1}: AllocError" in out, explain(proc)
    assert "allocation is forbidden here" in out


# --- sweeps ---------------------------------------------------------------------------------------


STDLIB = """
    import json
    import re
    import pytest

    # Real inputs: a JSON document like a small API response, and patterns
    # of the kind applications compile at import time.
    DOC = {
        "users": [
            {"id": n, "name": f"user {n}", "email": f"user{n}@example.org",
             "roles": ["reader", "writer"][: 1 + n % 2], "bio": "lorem ipsum " * 60}
            for n in range(12)
        ],
        "next": None,
    }
    PATTERNS = [
        r"(?P<year>\\d{4})-(?P<month>\\d\\d)-(?P<day>\\d\\d)T(?P<time>[0-9:.]+)(?:Z|[+-]\\d\\d:\\d\\d)?",
        r"^\\s*(?P<user>[a-z0-9._%+-]+)@(?P<host>(?:[a-z0-9-]+\\.)+[a-z]{2,})\\s*$",
    ]

    @pytest.mark.oom_sweep
    def test_json_round_trip():
        text = json.dumps(DOC, indent=2, sort_keys=True)
        assert json.loads(text) == DOC

    @pytest.mark.oom_sweep
    def test_re_compile():
        re.purge()
        date, mail = (re.compile(p, re.IGNORECASE) for p in PATTERNS)
        assert date.match("2024-05-01T10:20:30Z")["year"] == "2024"
        assert mail.match(" someone@example.org ")["host"] == "example.org"
"""


def sweep_lines(proc: subprocess.CompletedProcess, test: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(f"[oom_sweep] {test}: ")]


@pytest.mark.slow
def test_sweep_over_json_and_re_on_real_inputs_is_clean(tmp_path):
    # GIVEN tests that parse and dump JSON and compile regular expressions
    write(tmp_path, "test_stdlib.py", STDLIB)
    # WHEN each is swept: every allocation of its body failed in turn
    proc = pytest_in(tmp_path)
    # THEN every run either passes or raises MemoryError, and keeps nothing
    assert proc.returncode == 0, explain(proc)
    assert outcome(proc) == "2 passed", explain(proc)
    for test in ("test_stdlib.py::test_json_round_trip", "test_stdlib.py::test_re_compile"):
        lines = sweep_lines(proc, test)
        counted = re.fullmatch(rf"\[oom_sweep\] {test}: (\d+) allocations in the test body; "
                               r"failing (\d+) of them in turn", lines[0])
        assert counted and int(counted[1]) == int(counted[2]) > 10, lines
        done = re.match(rf"\[oom_sweep\] {test}: (\d+) of (\d+) allocations failed in turn, "
                        r"0 problem\(s\)", lines[-1])
        assert done and done[1] == done[2] == counted[1], lines


def test_sweep_bounds(tmp_path):
    write(tmp_path, "test_stdlib.py", STDLIB)
    proc = pytest_in(tmp_path, "-k", "json", "--oom-sweep-max-runs", "3")
    assert outcome(proc) == "1 passed, 1 deselected", explain(proc)
    assert re.search(r"test_json_round_trip: 3 of \d+ allocations failed in turn \(stride 1, max_runs 3\), "
                     r"0 problem\(s\)", proc.stdout), explain(proc)
    proc = pytest_in(tmp_path, "-k", "re_compile", "--oom-sweep-stride", "10")
    counted = re.search(r"test_re_compile: (\d+) allocations in the test body; failing (\d+) of them",
                        proc.stdout)
    assert counted and int(counted[2]) == len(range(1, int(counted[1]) + 1, 10)), explain(proc)


OTHER_EXCEPTION = """
    import pytest

    def parse(n):
        try:
            return [bytearray(1000 + i) for i in range(n)]
        except MemoryError:
            raise ValueError("could not parse")  # hides the MemoryError

    @pytest.mark.oom_sweep
    def test_strict():
        assert len(parse(5)) == 5

    @pytest.mark.oom_sweep(allow=ValueError)
    def test_allowed():
        assert len(parse(5)) == 5
"""


def test_sweep_reports_an_exception_other_than_memory_error(tmp_path):
    write(tmp_path, "test_other.py", OTHER_EXCEPTION)
    proc = pytest_in(tmp_path, "-rf")
    assert outcome(proc) == "1 failed, 1 passed", explain(proc)
    assert "FAILED test_other.py::test_strict - Failed: oom_sweep: 5 run(s) went wrong" in proc.stdout
    for index in range(1, 6):
        assert re.search(rf"allocation #{index} \(\d+ bytes\) failed: raised builtins.ValueError: "
                         r"could not parse at \S+test_other.py:\d+ in parse \(expected a MemoryError\)",
                         proc.stdout), explain(proc)


def _copy_demo(tmp_path: Path) -> Path:
    demo = tmp_path / "oom_sweep_demo"
    shutil.copytree(DEMO, demo, ignore=shutil.ignore_patterns("__pycache__"))
    return demo


def test_sweep_finds_the_leak_planted_in_the_example_and_passes_its_fix(tmp_path):
    # GIVEN the example: a cache that keeps a half-built entry when parsing
    # fails, and its fixed version, under the same test
    demo = _copy_demo(tmp_path)
    # WHEN the test is swept
    proc = pytest_in(demo, "-rA")
    # THEN the buggy version fails, naming each allocation whose failure
    # leaks, with the command that replays it; the fixed version passes
    assert proc.returncode == 1, explain(proc)
    assert outcome(proc) == "1 failed, 1 passed", explain(proc)
    out = proc.stdout
    assert "PASSED test_catalog.py::test_lookup_by_sku[catalog_fixed]" in out
    assert "FAILED test_catalog.py::test_lookup_by_sku[catalog]" in out
    leaks = re.findall(r"allocation #(\d+) \(\d+ bytes\) failed: leaked on the error path: "
                       r"(\d+) Python object\(s\) and (\d+) bytes of malloc memory", out)
    assert leaks, explain(proc)
    index = int(leaks[0][0])
    assert f"replay: pytest --oom-replay={index} 'test_catalog.py::test_lookup_by_sku[catalog]'" in out
    # The record and its source text (12 KiB of JSON, as bytes) stay cached.
    assert all(int(objects) >= 1 and int(nbytes) >= 12_000 for _, objects, nbytes in leaks), leaks

    # AND the replay fails that very allocation, in this process, where a
    # debugger can follow the error path
    replay = pytest_in(demo, f"--oom-replay={index}", "test_catalog.py::test_lookup_by_sku[catalog]")
    assert outcome(replay) == "1 failed", explain(replay)
    assert f"injected failure #{index} (replay with nth={index})" in replay.stdout
    assert f"[oom_replay] test_catalog.py::test_lookup_by_sku[catalog]: allocation #{index} failed" in replay.stdout
    assert "catalog.py:" in replay.stdout and "in load" in replay.stdout


CRASHING = """
    import ctypes
    import os
    import pytest

    lib = ctypes.CDLL(os.environ["OOMLIB"])
    lib.oomlib_copy_sum.restype = ctypes.c_long
    lib.oomlib_copy_sum.argtypes = [ctypes.c_char_p, ctypes.c_size_t]

    @pytest.mark.oom_sweep
    def test_checksum():
        data = bytes(range(256)) * 20
        assert lib.oomlib_copy_sum(data, len(data)) == 20 * sum(range(256))

    def test_afterwards():
        assert lib.oomlib_copy_sum(b"ab", 2) == 195

    @pytest.mark.oom_sweep
    def test_sweep_afterwards():
        assert bytearray(5000).count(0) == 5000
"""


def test_sweep_reports_a_segfaulting_extension_and_pytest_carries_on(tmp_path, build_c):
    # GIVEN a C library that writes through malloc's result without checking it
    write(tmp_path, "test_crashing.py", CRASHING)
    env = {"OOMLIB": build_c("oomlib", shared=True)}
    # WHEN a test calling it is swept
    proc = pytest_in(tmp_path, "-rA", env=env)
    # THEN the run where the library's malloc fails dies of SIGSEGV in its
    # forked child; the sweep names that allocation, and the session goes on
    assert outcome(proc) == "1 failed, 2 passed", explain(proc)
    # (the short summary of -rA may repeat the message: one index, named)
    crashed = set(re.findall(r"allocation #(\d+) failed: crashed with SIGSEGV", proc.stdout))
    assert len(crashed) == 1, explain(proc)
    (index,) = crashed
    assert f"replay: pytest --oom-replay={index} 'test_crashing.py::test_checksum'" in proc.stdout
    # faulthandler's report from the child is part of it
    assert "Fatal Python error: Segmentation fault" in proc.stdout
    assert "PASSED test_crashing.py::test_afterwards" in proc.stdout
    assert "PASSED test_crashing.py::test_sweep_afterwards" in proc.stdout

"""The pytest plugin, run as users run it: pytest in a child process under
``allocpolicy run``, on small test files written for each case.

The child loads the plugin by module (``-p allocpolicy.pytest_plugin``, with
the entry point's name blocked so an installed copy does not load twice); that
the ``pytest11`` entry point registers it is checked on its own.
"""

from __future__ import annotations

import functools
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
STDLIB_SHOWCASE = REPO / "examples" / "sweep_stdlib"
TIMEOUT = 300
LOAD_PLUGIN = ("-p", "no:allocpolicy", "-p", "allocpolicy.pytest_plugin")
HOW_TO_RUN = "run pytest under the runtime: `allocpolicy run -- python -m pytest ...`"
IN_PROCESS = (
    "allocpolicy: runtime installed in this process (not preloaded): budgets, no_alloc and "
    "sweeps see Python's allocator domains and NumPy's data, not native allocations "
    "(malloc from C code); for those, `allocpolicy run -- python -m pytest ...`"
)
#: No runtime at all: neither preloaded nor loadable into the process.
NO_LIBRARY = {"ALLOCPOLICY_LIBRARY": "/nonexistent/liballocpolicy.so"}
BOTH_WAYS = pytest.mark.parametrize("preload", [True, False], ids=["preloaded", "in-process"])


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
                   "--oom-sweep-stride=K", "--oom-sweep-time=SECONDS", "--oom-sweep-sample=N",
                   "--oom-sweep-seed=SEED", "--oom-sweep-jobs=N", "--oom-replay=INDEX",
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


NOT_LOADABLE = (
    "needs the allocpolicy runtime, which is not preloaded and could not be installed in this "
    "process (ALLOCPOLICY_LIBRARY names '/nonexistent/liballocpolicy.so', which is not a file; "
    f"unset it to use the library shipped with the package); {HOW_TO_RUN}"
)


def test_plain_pytest_installs_the_runtime_in_process_and_says_so_once(tmp_path):
    write(tmp_path, "test_marked.py", MARKED + "\n    test_again = test_budgeted\n")
    proc = pytest_in(tmp_path, "-rs", preload=False)
    assert proc.returncode == 0, explain(proc)
    assert outcome(proc) == "3 passed", explain(proc)
    assert proc.stdout.count(IN_PROCESS) == 1, explain(proc)
    # An option asks for it before the first test: the header says it.
    proc = pytest_in(tmp_path, "--alloc-budget", "64 MiB", preload=False)
    assert outcome(proc) == "3 passed", explain(proc)
    assert proc.stdout.count(IN_PROCESS) == 1, explain(proc)
    # Preloaded, nothing is installed and nothing said.
    proc = pytest_in(tmp_path)
    assert outcome(proc) == "3 passed" and IN_PROCESS not in proc.stdout, explain(proc)


def test_without_any_runtime_marked_tests_are_skipped_and_say_why(tmp_path):
    write(tmp_path, "test_marked.py", MARKED)
    proc = pytest_in(tmp_path, "-rs", preload=False, env=NO_LIBRARY)
    assert proc.returncode == 0, explain(proc)
    assert outcome(proc) == "1 passed, 1 skipped"
    assert NOT_LOADABLE in proc.stdout, explain(proc)


def test_without_any_runtime_the_ini_can_make_them_fail(tmp_path):
    write(tmp_path, "test_marked.py", MARKED, ini="allocpolicy_unavailable = fail\n")
    proc = pytest_in(tmp_path, "-rE", preload=False, env=NO_LIBRARY)
    assert proc.returncode == 1, explain(proc)
    # Failing in setup is an error, in pytest's words.
    assert outcome(proc) == "1 passed, 1 error"
    assert "ERROR test_marked.py::test_budgeted - Failed: needs the allocpolicy runtime" in proc.stdout
    assert NOT_LOADABLE in proc.stdout, explain(proc)


def test_without_any_runtime_the_options_refuse_to_start(tmp_path):
    write(tmp_path, "test_marked.py", MARKED)
    proc = pytest_in(tmp_path, "--oom-sweep", preload=False, env=NO_LIBRARY)
    assert proc.returncode == 4, explain(proc)  # pytest's usage error
    assert "--oom-sweep needs the allocpolicy runtime, which could not be installed in this process " \
           "(ALLOCPOLICY_LIBRARY names" in proc.stderr, explain(proc)


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


@BOTH_WAYS
def test_alloc_budget_fails_the_test_at_the_allocation_that_crossed_it(tmp_path, preload):
    # GIVEN a test with an 8 MiB budget that holds 2 MiB and asks for 16 MiB more
    path = write(tmp_path, "test_budget.py", BUDGET)
    # WHEN it runs under the plugin, preloaded or in-process (Python's RAW
    # domain sees the large blocks)
    proc = pytest_in(tmp_path, "-p", "no:randomly", preload=preload)
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
    # Plain pytest enforces it in-process, as the preload does.
    proc = pytest_in(tmp_path, "-rf", preload=False)
    assert outcome(proc) == "1 failed, 2 passed", explain(proc)
    assert "FAILED test_defaults.py::test_default - allocpolicy._errors.AllocError" in proc.stdout


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


@BOTH_WAYS
def test_no_alloc_marker_and_fixture_and_the_stats_fixture(tmp_path, preload):
    path = write(tmp_path, "test_no_alloc.py", NO_ALLOC)
    proc = pytest_in(tmp_path, "-rA", preload=preload)
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
        # Not indent=: json's pure-Python encoder keeps the encoder and its
        # closures alive after a MemoryError (docs/testing.rst shows it).
        text = json.dumps(DOC, sort_keys=True)
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


#: Shows, with _testcapi.set_nomemory and without allocpolicy, the defects of
#: CPython 3.12 and 3.13 that a sweep of a JSON round trip finds
#: (docs/testing.rst).
CPYTHON_DEFECTS = STDLIB_SHOWCASE / "cpython_defects.py"
#: What a sweep of a JSON round trip reports for each of them.
DEFECT_FINDINGS = {
    # A failed function creation (json.encoder's iterencode makes floatstr on
    # every call) frees the function's code object, which iterencode's code
    # still holds: the next json.dumps, the sweep child's own, crashes on it.
    "function creation": (r"\(\d+ bytes from PyObject_Malloc\) failed: crashed with SIGSEGV after the body "
                          r"raised: the failure left the process broken, and the code that ran next "
                          r"\(the sweep's own\) crashed on it",),
    # The C encoder returns a result with the MemoryError of its last
    # allocation still set, which CPython turns into a SystemError.
    "json encoder": (r"\(\d+ bytes from PyObject_Malloc\) failed: raised builtins.SystemError: "
                     r"<_json.Encoder object at 0x[0-9a-f]+> returned a result with an exception set "
                     r"at \S+json/encoder\.py:\d+ in iterencode \(expected a MemoryError\)",),
    # The C scanner of json.loads (3.13): a failure while its dictionary of
    # keys grows breaks that dictionary, and the scanner crashes in the body.
    "json decoder": (r"failed: crashed with SIGSEGV",),
}


@functools.cache
def cpython_defects_shown() -> str:
    """What CPYTHON_DEFECTS prints on this CPython, in a child process
    without the runtime."""
    proc = subprocess.run([sys.executable, str(CPYTHON_DEFECTS)], env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    if proc.returncode == 2:
        pytest.skip(f"{proc.stderr.strip()}: cannot tell which defects of {CPYTHON_DEFECTS.name} "
                    "this CPython has, which a sweep of a JSON round trip finds")
    assert proc.returncode == 0, explain(proc)
    return proc.stdout


def cpython_defects() -> frozenset[str]:
    """The defects of CPYTHON_DEFECTS that this CPython has."""
    checks = dict(re.findall(r"^(.+?): (present|absent) \(", cpython_defects_shown(), re.M))
    assert set(checks) == set(DEFECT_FINDINGS), cpython_defects_shown()
    return frozenset(name for name, state in checks.items() if state == "present")


def test_cpython_defects_show_what_the_docs_record():
    # GIVEN what docs/testing.rst records of cpython_defects.py, per CPython
    page = (REPO / "docs" / "testing.rst").read_text()
    runs = re.findall(r"^   \$ python3\.\d+ examples/sweep_stdlib/cpython_defects\.py\n((?:   [^$\n].*\n)+)",
                      page, re.M)
    recorded = {block.splitlines()[0].strip(): textwrap.dedent(block) for block in runs}
    assert set(recorded) == {"CPython 3.11.7", "CPython 3.12.1", "CPython 3.13.0"}, recorded
    # WHEN it runs on this CPython
    shown = cpython_defects_shown()
    # THEN every check says present or absent, and on a CPython the page
    # records, what the page shows (but for the counts of allocations,
    # which move by one or two with the process's environment)
    assert len(cpython_defects()) <= len(DEFECT_FINDINGS)
    version, *checks = shown.splitlines()
    if version in recorded:
        def uncounted(lines: list[str]) -> list[str]:
            return [re.sub(r"\d+", "N", line) for line in lines]

        assert uncounted(checks) == uncounted(recorded[version].splitlines()[1:]), shown


def findings(out: str, test: str) -> list[tuple[int, str]]:
    """(index, what went wrong) of each run the sweep of ``test`` reported,
    once each (the short summary of -rA may repeat the report)."""
    told = re.findall(rf"^allocation #(\d+) (.*)\n(?:(?!allocation #).*\n)*?  replay: pytest "
                      rf"--oom-replay=\1 '{re.escape(test)}'$", out, re.M)
    return list(dict.fromkeys((int(index), problem) for index, problem in told))


def cpythons_defects_found(proc: subprocess.CompletedProcess, test: str) -> set[str]:
    """Which of this CPython's defects the sweep of ``test`` (a JSON round
    trip) found; it found nothing else."""
    found = findings(proc.stdout, test)
    kinds = {name: [index for index, problem in found if any(re.fullmatch(f, problem) for f in told)]
             for name, told in DEFECT_FINDINGS.items()}
    assert sum(map(len, kinds.values())) == len(found), explain(proc)  # nothing else
    # Each crash is shown where it happened: in json's encoder, for a
    # function creation that failed in the body; in its decoder, in the body.
    for name, where in (("function creation", "encoder"), ("json decoder", "decoder")):
        for index in kinds[name]:
            assert re.search(rf"^allocation #{index} .*crashed with SIGSEGV.*\n(    \|.*\n)*?"
                             rf"    \|.*json/{where}\.py", proc.stdout, re.M), explain(proc)
    named = {name for name, indices in kinds.items() if indices}
    assert named <= cpython_defects(), explain(proc)
    return named


@pytest.mark.slow
@BOTH_WAYS
def test_sweep_over_json_on_real_inputs_finds_only_cpythons_defects(tmp_path, preload):
    # GIVEN a test that dumps and parses a JSON document (re.compile, beside
    # it, is not clean: CPython 3.11's re raises SystemError at a few indices)
    write(tmp_path, "test_stdlib.py", STDLIB)
    # WHEN it is swept: every allocation of its body (hundreds, from
    # Python's domains) failed in turn
    proc = pytest_in(tmp_path, "-k", "json", preload=preload)
    test = "test_stdlib.py::test_json_round_trip"
    lines = sweep_lines(proc, test)
    counted = re.fullmatch(rf"\[oom_sweep\] {test}: (\d+) allocations in the test body; "
                           r"failing (\d+) of them in turn(, \d+ at a time)?", lines[0])
    assert counted and counted[1] == counted[2] and int(counted[1]) > 100, explain(proc)
    done = re.match(rf"\[oom_sweep\] {test}: (\d+) of (\d+) allocations failed in turn "
                    r"\[.*PyObject_Malloc: \d+.*\], (\d+) problem\(s\)", lines[-1])
    assert done and done[1] == done[2] == counted[1], lines
    # THEN every run either passes or raises MemoryError, and keeps nothing,
    # but for what CPython's own defects do there (3.12 and 3.13), each
    # found and told for what it is
    if cpython_defects():
        assert outcome(proc) == "1 failed, 1 deselected", explain(proc)
        # (the document of cpython_defects.py's checks: each defect found)
        assert cpythons_defects_found(proc, test) == cpython_defects(), explain(proc)
    else:
        assert proc.returncode == 0, explain(proc)
        assert outcome(proc) == "1 passed, 1 deselected", explain(proc)
        assert done[3] == "0", lines


def test_sweep_bounds(tmp_path):
    write(tmp_path, "test_stdlib.py", STDLIB)
    proc = pytest_in(tmp_path, "-k", "json", "--oom-sweep-max-runs", "3")
    assert outcome(proc) == "1 passed, 1 deselected", explain(proc)
    assert re.search(r"test_json_round_trip: 3 of \d+ allocations failed in turn \(max_runs 3\) \[.*\], "
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
    failed = re.search(r"FAILED test_other.py::test_strict - Failed: oom_sweep: (\d+) run\(s\) went wrong",
                       proc.stdout)
    # Each of the five bytearrays is two allocations at least (the object,
    # its buffer), and each failure inside parse() turns into the ValueError.
    assert failed and int(failed[1]) >= 10, explain(proc)
    # The short summary may repeat the whole report (on a wide terminal):
    # each allocation counts once.
    reported = dict(
        (int(index), (entry_point, problem)) for index, entry_point, problem
        in re.findall(r"allocation #(\d+) \(\d+ bytes from (\S+)\) failed: (.*)", proc.stdout)
    )
    assert len(reported) == min(10, int(failed[1])), explain(proc)
    for entry_point, problem in reported.values():
        assert entry_point in ("PyObject_Malloc", "PyMem_Malloc", "PyMem_RawMalloc", "malloc"), reported
        assert re.fullmatch(r"raised builtins.ValueError: could not parse at \S+test_other.py:\d+ in parse "
                            r"\(expected a MemoryError\)", problem), problem


def _copy_demo(tmp_path: Path) -> Path:
    demo = tmp_path / "oom_sweep_demo"
    shutil.copytree(DEMO, demo, ignore=shutil.ignore_patterns("__pycache__"))
    return demo


def test_sweep_finds_the_leak_planted_in_the_example_and_passes_its_fix(tmp_path):
    # GIVEN the example: a cache that keeps a half-built entry when parsing
    # fails, and its fixed version, under the same test
    demo = _copy_demo(tmp_path)
    # WHEN the test is swept, over its first 40 allocations (parsing the
    # 12 KiB catalogue makes thousands; the record is cached at the first)
    proc = pytest_in(demo, "-rA", "--oom-sweep-max-runs", "40")
    # THEN the buggy version fails, naming each allocation whose failure
    # leaks, with the command that replays it; the fixed version passes
    assert proc.returncode == 1, explain(proc)
    assert outcome(proc) == "1 failed, 1 passed", explain(proc)
    out = proc.stdout
    assert "PASSED test_catalog.py::test_lookup_by_sku[catalog_fixed]" in out
    assert "FAILED test_catalog.py::test_lookup_by_sku[catalog]" in out
    leaks = re.findall(r"allocation #(\d+) \(\d+ bytes from \S+\) failed: leaked on the error path: "
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
    # The refused allocation is made inside load(), or in what load() calls
    # (json.loads), depending on the Python: its frame is in the traceback.
    assert re.search(r"catalog.py:\d+: (AllocError|in load)", replay.stdout), explain(replay)
    assert "AllocError: allocation of" in replay.stdout, explain(replay)


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


BROKEN_AFTER = """
    import ctypes
    import gc
    import pytest

    def use_what_was_freed(phase, info):
        ctypes.string_at(0)  # the pointer the error path left behind

    @pytest.mark.oom_sweep
    def test_error_path_leaves_a_dangling_pointer():
        try:
            rows = [bytearray(100) for _ in range(3)]
        except MemoryError:
            # BUG: the next collection, whoever makes it, crashes.
            gc.callbacks.append(use_what_was_freed)
            raise
        assert len(rows) == 3
"""


def test_a_crash_after_the_body_is_told_as_one(tmp_path):
    # GIVEN a body whose error path leaves the process broken for later
    # code: the next garbage collection crashes
    write(tmp_path, "test_broken.py", BROKEN_AFTER)
    # WHEN it is swept
    proc = pytest_in(tmp_path, "-rA")
    # THEN the runs that failed an allocation of the list die of SIGSEGV in
    # the sweep's own collection after the body: each is told as a crash
    # after the body raised, with the allocation that caused it
    assert outcome(proc) == "1 failed", explain(proc)
    test = "test_broken.py::test_error_path_leaves_a_dangling_pointer"
    found = findings(proc.stdout, test)
    after = [index for index, problem in found if re.fullmatch(
        r"\(\d+ bytes from \S+\) failed: crashed with SIGSEGV after the body raised \S*(MemoryError|AllocError): "
        r"the failure left the process broken, and the code that ran next \(the sweep's own\) crashed on it",
        problem)]
    assert after and len(after) == len(found), explain(proc)
    assert "in use_what_was_freed" in proc.stdout, explain(proc)  # faulthandler's report


# --- ordinary Python code, with or without the preload -------------------------------------------


PLANTED = """
    import json
    import pytest

    _cache = {}

    def load(key, n):
        # BUG: the entry is cached before the loop that fills it; a failure
        # in the loop leaves it there, holding what was built so far.
        entry = _cache[key] = {"rows": []}
        for i in range(n):
            entry["rows"].append(("row", i * 1000, str(i)))
        return entry

    def load_clean(key, n):
        entry = _cache[key] = {"rows": []}
        try:
            for i in range(n):
                entry["rows"].append(("row", i * 1000, str(i)))
        except MemoryError:
            del _cache[key]
            raise
        return entry

    @pytest.mark.oom_sweep
    def test_planted_leak():
        assert len(load("k", 20)["rows"]) == 20
        _cache.pop("k")

    @pytest.mark.oom_sweep
    def test_cleans_up_on_memory_error():
        assert len(load_clean("k", 20)["rows"]) == 20
        _cache.pop("k")

    @pytest.mark.oom_sweep
    def test_json_round_trip():
        doc = {"name": "widget", "tags": ["a", "b"] * 5, "sizes": list(range(30)), "price": 2.5}
        assert json.loads(json.dumps(doc)) == doc
"""

LEAK_ID = "test_planted.py::test_planted_leak"


@BOTH_WAYS
def test_a_leak_of_small_python_objects_is_found_with_or_without_the_preload(tmp_path, preload):
    # GIVEN a cache entry inserted before a loop that builds small objects
    # (pymalloc's, never malloc's), not removed on error; the same code
    # that cleans up on MemoryError; and a JSON round trip
    write(tmp_path, "test_planted.py", PLANTED)
    # WHEN they are swept, by default (no PYTHONMALLOC=malloc)
    proc = pytest_in(tmp_path, "-rA", preload=preload)
    # THEN the leak fails, at allocations of Python's object domain, each
    # named with the command that replays it; the clean code passes
    out = proc.stdout
    if cpython_defects():
        # The JSON round trip is clean but for CPython's own defects
        # (cpython_defects.py shows them without allocpolicy).
        assert outcome(proc) == "2 failed, 1 passed", explain(proc)
        assert "FAILED test_planted.py::test_json_round_trip" in out
        # (its document is too small for json.loads' dictionary of keys to
        # grow: the decoder's defect is not reached)
        found = cpythons_defects_found(proc, "test_planted.py::test_json_round_trip")
        assert found == cpython_defects() - {"json decoder"}, explain(proc)
    else:
        assert outcome(proc) == "1 failed, 2 passed", explain(proc)
        assert "PASSED test_planted.py::test_json_round_trip" in out
    assert f"FAILED {LEAK_ID}" in out
    assert "PASSED test_planted.py::test_cleans_up_on_memory_error" in out
    # (the short summary may repeat the whole report: each allocation counts once)
    leaks = list(dict.fromkeys(re.findall(
        r"allocation #(\d+) \((\d+) bytes from (\S+)\) failed: leaked on the error path: "
        r"(\d+) Python object\(s\) still held", out)))
    assert len(leaks) == 10, explain(proc)  # the first ten are told in full
    assert {entry_point for _, _, entry_point, _ in leaks} <= {"PyObject_Malloc", "PyMem_Malloc"}, leaks
    assert all(int(objects) >= 2 for *_, objects in leaks), leaks  # the entry and its list at least
    index, size, entry_point, _ = leaks[0]
    assert f"replay: pytest --oom-replay={index} '{LEAK_ID}'" in out
    assert IN_PROCESS in out if not preload else IN_PROCESS not in out

    # AND the replay fails that very allocation (same size, same domain), in
    # the pytest process, inside load()
    replay = pytest_in(tmp_path, f"--oom-replay={index}", LEAK_ID, preload=preload)
    assert outcome(replay) == "1 failed", explain(replay)
    assert (f"AllocError: allocation of {size} bytes refused in scope 'pytest': injected failure "
            f"#{index} (replay with nth={index})") in replay.stdout, explain(replay)
    assert f"[oom_replay] {LEAK_ID}: allocation #{index} failed" in replay.stdout
    assert re.search(r"test_planted.py:\d+: AllocError", replay.stdout), explain(replay)
    assert "in load" in replay.stdout or "def load(key, n):" in replay.stdout, explain(replay)


ASYNC = """
    import asyncio
    import pytest

    # A run that hangs is killed after 5 s (and reported as hung).

    _cache = {}

    async def fetch(key, n, clean):
        entry = _cache[key] = []
        try:
            for i in range(n):
                await asyncio.sleep(0)
                entry.append(("row", str(i)))
        except BaseException:
            if clean:
                del _cache[key]
            raise
        return entry

    @pytest.mark.oom_sweep(timeout=5)
    async def test_leaks():
        assert len(await fetch("k", 4, clean=False)) == 4
        _cache.clear()

    @pytest.mark.oom_sweep(timeout=5)
    async def test_clean():
        assert len(await fetch("k", 4, clean=True)) == 4
        _cache.clear()

    @pytest.mark.alloc_budget("1 MiB")
    async def test_budget_follows_the_task():
        await asyncio.sleep(0)
        with pytest.raises(MemoryError):
            bytearray(4 << 20)
"""


ASYNC_WAYS = pytest.mark.parametrize("preload", [True, False], ids=["preloaded", "in-process"])


@ASYNC_WAYS
def test_async_tests_are_swept_in_their_own_task(tmp_path, preload):
    write(tmp_path, "test_async.py", ASYNC)
    proc = pytest_in(tmp_path, "-rA", preload=preload)
    assert outcome(proc) == "1 failed, 2 passed", explain(proc)
    out = proc.stdout
    assert "FAILED test_async.py::test_leaks" in out
    assert "PASSED test_async.py::test_clean" in out
    assert re.search(r"allocation #\d+ \(\d+ bytes from PyObject_Malloc\) failed: leaked on the error path",
                     out), explain(proc)
    # The body's allocations are numbered, not the loop's: a few dozen.
    counted = re.search(r"\[oom_sweep\] test_async.py::test_clean: (\d+) allocations in the test body", out)
    assert counted and 10 < int(counted[1]) < 200, explain(proc)


def test_sampled_sweeps_pick_the_same_indices_whatever_the_number_of_jobs(tmp_path):
    write(tmp_path, "test_planted.py", PLANTED)
    found = []
    for jobs in ("1", "3"):
        proc = pytest_in(tmp_path, LEAK_ID, "--oom-sweep-sample", "8", "--oom-sweep-seed", "5",
                         "--oom-sweep-jobs", jobs)
        assert outcome(proc) == "1 failed", explain(proc)
        total = int(re.search(rf"{re.escape(LEAK_ID)}: (\d+) allocations in the test body; failing 8 "
                              r"of them in turn \(a sample of 8, seed 5\)", proc.stdout)[1])
        found.append(sorted({int(i) for i in re.findall(r"allocation #(\d+) \(", proc.stdout)}))
        if jobs == "3":
            assert "8 of them in turn (a sample of 8, seed 5), 3 at a time" in proc.stdout
    # The leak shows at every index after the entry was cached: all of the
    # sample but the few before it, in the order the seed drew them.
    import random

    drawn = sorted(random.Random(5).sample(range(1, total + 1), 8))
    assert found[0] == found[1], found
    assert set(found[0]) <= set(drawn) and len(found[0]) >= 6, (found, drawn)


def test_the_stdlib_showcase_finds_csv_losing_its_memory_error_and_replays_it(tmp_path):
    # GIVEN the documented sweep of csv.DictReader (docs/testing.rst)
    shutil.copytree(STDLIB_SHOWCASE, tmp_path / "show", ignore=shutil.ignore_patterns("__pycache__"))
    where = tmp_path / "show"
    (where / "pytest.ini").write_text("[pytest]\n")
    # WHEN it is swept
    proc = pytest_in(where, "-k", "csv")
    # THEN the last allocation's failure comes out as CPython's SystemError,
    # not MemoryError, and the replay reproduces it
    assert outcome(proc) == "1 failed, 3 deselected", explain(proc)
    found = re.findall(r"allocation #(\d+) \(\d+ bytes from PyObject_Malloc\) failed: raised builtins.SystemError: "
                       r"<function DictReader.__next__ at 0x[0-9a-f]+> returned NULL without setting an exception",
                       proc.stdout)
    total = re.search(r"test_csv_reader: (\d+) allocations in the test body", proc.stdout)
    assert found and total and found[-1] == total[1], explain(proc)
    replay = pytest_in(where, f"--oom-replay={found[-1]}", "-k", "csv")
    assert f"[oom_replay] test_stdlib_sweep.py::test_csv_reader: allocation #{found[-1]} failed" in replay.stdout
    assert "SystemError: <function DictReader.__next__" in replay.stdout, explain(replay)

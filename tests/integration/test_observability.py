"""Seeing what a running process does: refusals by reason, the refusal hook,
and the stats socket read by `allocpolicy stats`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from runtime_run import check, run_python

TIMEOUT = 60

POLICY = """
version = 1
[scopes.request]
on_oom = "raise"
budget = "16 MiB"
[scopes.quiet]
on_oom = "raise"
forbid = true
"""


def test_refusals_are_counted_by_reason_for_the_innermost_scope(tmp_path):
    out = check(run_python(
        """
        import allocpolicy, json
        def refuse(scope, fn):
            try:
                with allocpolicy.task(scope):
                    fn()
            except allocpolicy.AllocError as err:
                return err.reason
        print(refuse("request", lambda: bytearray(64 << 20)))
        print(refuse("request", lambda: bytearray(32 << 20)))
        with allocpolicy.inject(scope="request", nth=1):
            print(refuse("request", lambda: bytearray(1 << 20)))
        print(refuse("quiet", lambda: bytearray(100_000)))
        s = allocpolicy.stats()
        print(json.dumps({name: sc.refusals for name, sc in s.scopes.items()}))
        print(json.dumps(s.process.refusals), s.process.violations, s.scopes["request"].violations)
        """, POLICY, tmp_path))
    lines = out.splitlines()
    assert lines[:4] == ["budget", "budget", "injected", "forbidden"]
    by_scope = json.loads(lines[4])
    assert by_scope["request"] == {"budget": 2, "oom": 0, "injected": 1, "forbidden": 0}
    assert by_scope["quiet"]["forbidden"] >= 1 and by_scope["quiet"]["budget"] == 0
    process, total, request = lines[5].rsplit(" ", 2)
    process = json.loads(process)
    # The process's refusals are the sum over scopes; each scope's sum is its violations.
    assert process["budget"] == 2 and process["injected"] == 1
    assert sum(process.values()) == int(total)
    assert sum(by_scope["request"].values()) == int(request)


def test_on_refusal_sees_each_refusal_once_with_its_facts_at_the_boundary(tmp_path):
    out = check(run_python(
        """
        import allocpolicy, threading
        seen = []
        hook = allocpolicy.on_refusal(lambda err: seen.append(
            (err.scope, err.size, err.budget, err.reason, err.task, allocpolicy.stats().scopes["request"].active)))
        try:
            with allocpolicy.task("request"):
                with allocpolicy.task("request"):   # the inner boundary converts it; the outer sees AllocError
                    bytearray(64 << 20)
        except allocpolicy.AllocError:
            pass
        # a bind() wrapper is a boundary too
        with allocpolicy.scope("request"):
            bound = allocpolicy.bind(lambda: bytearray(32 << 20))
        t = threading.Thread(target=lambda: seen.append(("thread", type(_try(bound)).__name__)))
        def _try(fn):
            try:
                fn()
            except Exception as exc:
                return exc
        t.start(); t.join()
        del bound  # the wrapper held its instance
        # the fallible API reports to its caller, not to the hook
        with allocpolicy.scope("request"):
            try:
                allocpolicy.reserve(1 << 30)
            except allocpolicy.AllocError:
                pass
        # the end of a forbid scope, inside a task: reported once, by the scope
        try:
            with allocpolicy.task("request"):
                with allocpolicy.scope("quiet"):
                    bytearray(100_000)
        except allocpolicy.AllocError:
            pass
        assert allocpolicy.remove_refusal_hook(hook) and not allocpolicy.remove_refusal_hook(hook)
        try:
            with allocpolicy.task("request"):
                bytearray(64 << 20)
        except allocpolicy.AllocError:
            pass
        for s in seen:
            print(s)
        """, POLICY, tmp_path))
    assert out.splitlines() == [
        f"('request', {(64 << 20) + 1}, {16 << 20}, 'budget', 'request', 1)",
        f"('request', {(32 << 20) + 1}, {16 << 20}, 'budget', 'request', 1)",
        "('thread', 'AllocError')",
        "('quiet', 100001, None, 'forbidden', None, 1)",
    ]


def test_a_failing_callback_never_replaces_the_refusal(tmp_path):
    proc = run_python(
        """
        import allocpolicy
        calls = []
        @allocpolicy.on_refusal
        def broken(err):
            raise RuntimeError("the metrics backend is down")
        allocpolicy.on_refusal(calls.append)   # later callbacks still run
        try:
            with allocpolicy.task("request"):
                bytearray(64 << 20)
        except allocpolicy.AllocError as err:
            print("AllocError", err.reason, len(calls), calls[0] is err)
        """, POLICY, tmp_path)
    assert check(proc) == "AllocError budget 1 True\n"
    lines = proc.stderr.splitlines()
    assert lines[0] == "allocpolicy: exception ignored in on_refusal callback broken:"
    assert lines[-1] == "RuntimeError: the metrics backend is down"
    # only the callback's own failure is shown, not the MemoryError being converted
    assert "MemoryError" not in proc.stderr


def _stats_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "allocpolicy", "stats", *args],
                          capture_output=True, text=True, timeout=TIMEOUT)


SERVE_AND_WAIT = """
import allocpolicy, os, sys
try:
    with allocpolicy.task("request"):
        bytearray(64 << 20)
except allocpolicy.AllocError:
    pass
if "fork" in sys.argv:
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(w)
        print("child", os.getpid(), flush=True)
        os.read(r, 1)          # until the parent's stdin closes
        os._exit(0)
print("ready", os.getpid(), flush=True)
sys.stdin.read()
"""


def _start(tmp_path, *args, env=None, run_options=("--stats-socket",)):
    script = tmp_path / "serve.py"
    script.write_text(SERVE_AND_WAIT)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_")}
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "allocpolicy", "run", "--policy", str(policy), *run_options, "--",
         sys.executable, str(script), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)


def _stop(proc):
    proc.stdin.close()
    assert proc.wait(timeout=TIMEOUT) == 0, proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()


def test_stats_of_a_process_started_with_stats_socket(tmp_path):
    proc = _start(tmp_path)
    try:
        assert proc.stdout.readline() == f"ready {proc.pid}\n"
        doc = json.loads(_stats_cli(str(proc.pid), "--json").stdout)
        assert doc["pid"] == proc.pid
        assert doc["scopes"]["request"]["refusals"]["budget"] == 1
        assert doc["argv"][-1].endswith("serve.py")
        prom = _stats_cli(str(proc.pid), "--prometheus")
        assert prom.returncode == 0
        assert 'allocpolicy_scope_refusals_total{scope="request",reason="budget"} 1' in prom.stdout.splitlines()
        listed = _stats_cli()
        assert f"{proc.pid}  " in listed.stdout and "serve.py" in listed.stdout
        listed = json.loads(_stats_cli("--json").stdout)
        assert {"pid": proc.pid, "command": " ".join(doc["argv"])} in listed
        both = _stats_cli(str(proc.pid), "--socket", "@x")
        assert (both.returncode, both.stderr) == (2, "allocpolicy: error: stats: give PID or --socket ADDRESS, not both\n")
    finally:
        _stop(proc)


def _said(proc, words: set[str]) -> dict[str, int]:
    """The first ``WORD PID`` line of each of ``words`` on ``proc``'s output,
    read for at most TIMEOUT seconds (what was read, and the process's
    stderr if it ended, are in the failure)."""
    said: dict[str, int] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            parts = line.split()
            if len(parts) == 2 and parts[0] in words:
                said[parts[0]] = int(parts[1])
                if set(said) == words:
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(TIMEOUT)
    if set(said) != words:
        ended = proc.poll()
        detail = proc.stderr.read() if ended is not None else "(still running)"
        raise AssertionError(f"expected lines {sorted(words)}, read {lines!r}; exit {ended}; stderr: {detail}")
    return said


def test_a_forked_child_serves_its_own_stats(tmp_path):
    proc = _start(tmp_path, "fork")
    try:
        # the parent's "ready" and the child's "child" lines, in either order
        said = _said(proc, {"ready", "child"})
        child = said["child"]
        doc = json.loads(_stats_cli(str(child), "--json").stdout)
        assert doc["pid"] == child
        # the child inherited the parent's counters at the fork, then went its own way
        assert doc["scopes"]["request"]["refusals"]["budget"] == 1
        assert json.loads(_stats_cli(str(proc.pid), "--json").stdout)["pid"] == proc.pid
    finally:
        _stop(proc)


def test_a_socket_path_with_pid_from_the_environment(tmp_path):
    proc = _start(tmp_path, env={"ALLOCPOLICY_STATS_SOCKET": str(tmp_path / "stats-{pid}.sock")}, run_options=())
    try:
        proc.stdout.readline()
        path = tmp_path / f"stats-{proc.pid}.sock"
        assert path.is_socket() and (path.stat().st_mode & 0o077) == 0
        # found through the process's environment, and directly
        assert json.loads(_stats_cli(str(proc.pid), "--json").stdout)["pid"] == proc.pid
        assert json.loads(_stats_cli("--socket", str(path), "--json").stdout)["pid"] == proc.pid
    finally:
        _stop(proc)
    assert not path.exists()


def test_stats_says_why_a_process_has_nothing_to_show(tmp_path):
    # a process that is not under the runtime
    plain = subprocess.Popen(["sleep", "30"])
    try:
        out = _stats_cli(str(plain.pid))
        assert out.returncode == 1
        assert out.stderr == f"allocpolicy: error: stats: process {plain.pid} (sleep 30) does not run under allocpolicy\n"
    finally:
        plain.send_signal(signal.SIGKILL)
        plain.wait()
    # a process under the runtime that was not asked to serve
    proc = _start(tmp_path, run_options=())
    try:
        proc.stdout.readline()
        out = _stats_cli(str(proc.pid))
        assert out.returncode == 1
        assert out.stderr.endswith(
            "runs under allocpolicy but does not serve its stats: start it with "
            "`allocpolicy run --stats-socket` (or ALLOCPOLICY_STATS_SOCKET=1 in its environment)\n")
    finally:
        _stop(proc)
    # a process that no longer exists
    out = _stats_cli(str(proc.pid))
    assert (out.returncode, out.stderr) == (1, f"allocpolicy: error: stats: no process {proc.pid}\n")
    # a program asked to serve that cannot (not Python)
    under = subprocess.Popen([sys.executable, "-m", "allocpolicy", "run", "--stats-socket", "--", "sleep", "30"])
    try:
        import time
        for _ in range(100):  # until run has exec'd sleep
            if open(f"/proc/{under.pid}/cmdline", "rb").read().startswith(b"sleep"):
                break
            time.sleep(0.05)
        out = _stats_cli(str(under.pid))
        assert out.returncode == 1
        assert f"process {under.pid} (sleep 30) was asked to serve its stats at @allocpolicy-stats-{under.pid}" in out.stderr
        assert "only Python programs serve them" in out.stderr
    finally:
        under.send_signal(signal.SIGKILL)
        under.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_only_the_processs_own_user_and_root_are_served(tmp_path):
    from allocpolicy._stats_socket import StatsUnavailable, read_stats

    proc = _start(tmp_path)
    try:
        proc.stdout.readline()
        address = f"@allocpolicy-stats-{proc.pid}"
        assert read_stats(address)["pid"] == proc.pid  # root (our user, too)
        r, w = os.pipe()
        child = os.fork()
        if child == 0:  # another user: nobody
            try:
                os.close(r)
                os.setuid(65534)
                try:
                    read_stats(address)
                    os.write(w, b"served")
                except StatsUnavailable as exc:
                    os.write(w, str(exc).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            said = f.read()
        os.waitpid(child, 0)
        assert said == f"process {proc.pid} serves its stats only to its own user and root"
    finally:
        _stop(proc)


def test_serve_stats_from_code_and_moving_the_socket(tmp_path):
    out = check(run_python(
        """
        import os, allocpolicy
        from allocpolicy._stats_socket import StatsUnavailable, read_stats
        first = allocpolicy.serve_stats("@observability-test-{pid}")
        print(os.getpid())
        print(first == f"@observability-test-{os.getpid()}", read_stats(first)["pid"] == os.getpid())
        second = allocpolicy.serve_stats(str(__import__("pathlib").Path.cwd() / "s.sock"))
        try:
            read_stats(first)
        except StatsUnavailable as exc:
            print("moved:", exc)
        print(read_stats(second)["scopes"]["task"]["instances"])
        """, None, tmp_path))
    pid, *rest = out.splitlines()
    assert rest == ["True True", f"moved: nothing serves stats at @observability-test-{pid}", "0"]


def test_an_address_that_cannot_be_bound_warns_and_the_program_runs(tmp_path):
    proc = run_python("print('ran')", None, tmp_path,
                      env={"ALLOCPOLICY_STATS_SOCKET": str(tmp_path / "missing" / "s.sock")})
    assert check(proc) == "ran\n"
    assert "AllocPolicyWarning: ALLOCPOLICY_STATS_SOCKET=" in proc.stderr
    assert "cannot serve the stats of process" in proc.stderr and "No such file or directory" in proc.stderr


def test_on_refusal_hears_of_regions_and_overdrafts_but_not_of_the_fallible_api(tmp_path):
    out = check(run_python(
        """
        import allocpolicy
        seen = []
        allocpolicy.on_refusal(lambda err: seen.append((err.reason, err.limit)))
        try:
            with allocpolicy.no_alloc():
                bytearray(100_000)
        except allocpolicy.AllocError:
            pass
        with allocpolicy.scope("request"):
            try:
                with allocpolicy.reserve(1 << 20, overdraft="raise"):
                    bytearray(4 << 20)
            except allocpolicy.AllocError:
                pass
            # the fallible API answers its caller: nothing to hear of
            assert isinstance(allocpolicy.try_reserve(1 << 30), allocpolicy.AllocError)
            left = allocpolicy.try_bytearray(1 << 30)
            assert isinstance(left, allocpolicy.AllocError), left
        print(seen)
        """, POLICY, tmp_path))
    assert out == "[('forbidden', None), ('budget', 'reservation')]\n"


@pytest.mark.skipif(subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0,
                    reason="needs unshare -n (a network namespace)")
def test_a_process_in_another_network_namespace_is_named_as_such(tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(SERVE_AND_WAIT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_")}
    proc = subprocess.Popen(
        ["unshare", "-n", sys.executable, "-m", "allocpolicy", "run", "--stats-socket", "--",
         sys.executable, str(script)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        pid = int(proc.stdout.readline().split()[1])  # unshare exec'd run, which exec'd python
        out = _stats_cli(str(pid))
        assert out.returncode == 1
        assert f"process {pid} (" in out.stderr and ") runs in another network namespace" in out.stderr
        hint = ["nsenter", "-t", str(pid), "-n", sys.executable, "-m", "allocpolicy", "stats", str(pid), "--json"]
        assert f"nsenter -t {pid} -n allocpolicy stats {pid}" in out.stderr
        inside = subprocess.run(hint, capture_output=True, text=True, timeout=TIMEOUT)
        assert inside.returncode == 0, inside.stderr
        assert json.loads(inside.stdout)["pid"] == pid
    finally:
        _stop(proc)

"""The metrics example: a real HTTP server on loopback under `allocpolicy run`,
scraped by Prometheus' rules and read from outside with `allocpolicy stats PID`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from runtime_run import REPO

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

TIMEOUT = 60


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _samples(text: str) -> dict[tuple, float]:
    """Every sample of a Prometheus exposition, by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLOCPOLICY_") and k != "LD_PRELOAD"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "allocpolicy", "run", "--stats-socket", "--",
         sys.executable, str(REPO / "examples" / "metrics_server.py"), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path),
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("metrics_server: listening on http://127.0.0.1:"), (
            line + proc.stderr.read() if proc.poll() is not None else line)
        yield proc, line.split()[-1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_refused_request_is_counted_in_the_scraped_metrics(server):
    proc, base = server
    refused = ("allocpolicy_scope_refusals_total", (("reason", "budget"), ("scope", "task")))
    # GIVEN a running server whose metrics show no refusal yet
    status, text = _get(base + "/metrics")
    assert status == 200
    before = _samples(text)
    assert before[refused] == 0
    assert before[("allocpolicy_runtime_active", ())] == 1
    # WHEN one ordinary request and one over the 256 MiB task budget are served
    assert _get(base + "/work?mib=8")[0] == 200
    status, body = _get(base + "/work?mib=1024")
    assert status == 507 and "refused in scope 'task'" in body, body
    assert _get(base + "/work?mib=8")[0] == 200  # and the server goes on
    # THEN the next scrape counts exactly that refusal, under its scope and reason
    after = _samples(_get(base + "/metrics")[1])
    assert after[refused] == 1
    assert after[("allocpolicy_process_refusals_total", (("reason", "budget"),))] == 1
    assert after[("allocpolicy_scope_instances_total", (("scope", "task"),))] == 3
    assert after[("allocpolicy_scope_budget_bytes", (("scope", "task"),))] == 256 << 20
    assert after[("allocpolicy_scope_active_instances", (("scope", "task"),))] == 0

    # AND `allocpolicy stats PID` reads the same counters from outside
    out = subprocess.run([sys.executable, "-m", "allocpolicy", "stats", str(proc.pid), "--json"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["pid"] == proc.pid
    assert doc["scopes"]["task"]["refusals"] == {"budget": 1, "oom": 0, "injected": 0, "forbidden": 0}
    assert doc["scopes"]["task"]["instances"] == 3
    table = subprocess.run([sys.executable, "-m", "allocpolicy", "stats", str(proc.pid)],
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"process {proc.pid}: ")
    assert "metrics_server.py" in table.stdout.splitlines()[0]

    # AND the on_refusal callback logged the refusal once, with its facts
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=TIMEOUT) == 0
    log = proc.stderr.read()
    refusal_lines = [l for l in log.splitlines() if "refused:" in l]
    assert refusal_lines == [
        f"metrics_server: refused: {(1024 << 20) + 1} bytes in scope 'task' (budget, budget {256 << 20})"
    ], log  # bytearray(n) asks for n + 1 bytes

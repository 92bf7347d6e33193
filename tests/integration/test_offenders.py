"""Libraries that do not check for NULL: OpenBLAS ends the process with
exit(1) when a budget refuses its buffer; ``include = ["openblas"]`` makes it
a fallible library scope and the product completes; ``allocpolicy libs``
warns about an uncovered OpenBLAS that allocated."""

from __future__ import annotations

import subprocess
import sys

import pytest

from web_load import APPS, child_env

numpy = pytest.importorskip("numpy")

POLICY = 'version = 1\n{include}[scopes.tiny]\nbudget = "3 MiB"\n[scopes.outside]\n'


def libs(tmp_path, include: bool, *args: str) -> subprocess.CompletedProcess:
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.format(include='include = ["openblas"]\n' if include else ""))
    return subprocess.run(
        [sys.executable, "-m", "allocpolicy", "libs", "--policy", str(policy), "--",
         sys.executable, str(APPS / "blas_in_task.py"), *args],
        env=child_env(), capture_output=True, text=True, timeout=120,
    )


def _openblas_rows(report: str) -> list[str]:
    return [line for line in report.splitlines() if "openblas" in line and line.startswith("  lib")]


def test_openblas_exits_the_process_when_its_buffer_is_refused(tmp_path):
    proc = libs(tmp_path, False)
    if not _openblas_rows(proc.stderr):
        pytest.skip("this NumPy does not use OpenBLAS")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "OpenBLAS" in proc.stderr and "product" not in proc.stdout and "AllocError" not in proc.stdout
    # the report shows the refusal OpenBLAS did not survive
    (row,) = _openblas_rows(proc.stderr)
    assert row.split()[3] == "1", row


def test_the_fragment_keeps_the_refusal_away_from_openblas(tmp_path):
    proc = libs(tmp_path, True)
    if not _openblas_rows(proc.stderr):
        pytest.skip("this NumPy does not use OpenBLAS")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("product 216000000.0")
    (row,) = _openblas_rows(proc.stderr)
    assert row.split()[3] == "0" and row.split()[-1] == "openblas", row
    assert "warning" not in proc.stderr


def test_libs_warns_about_an_uncovered_openblas_that_allocated(tmp_path):
    proc = libs(tmp_path, False, "600", "--outside")  # nothing refuses it
    if not _openblas_rows(proc.stderr):
        pytest.skip("this NumPy does not use OpenBLAS")
    assert proc.returncode == 0, proc.stderr
    warning, report = proc.stderr.split("allocpolicy: allocations by shared object", 1)
    assert "allocpolicy: warning: OpenBLAS (libscipy_openblas" in warning or "(libopenblas" in warning
    assert 'include = ["openblas"]' in warning

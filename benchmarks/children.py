"""What the Python benchmarks share: a measuring child started under the
preload, and the command line of a benchmark run on its own.

Each benchmark module has a ``child(...)`` that measures inside the process it
runs in and a ``measure(lib, quick=, repeats=)`` that starts that child under
the preload of ``lib``; the child prints its result as JSON on its last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent


def run_child(script: str, args: list[str], env: dict[str, str], what: str) -> dict:
    """Run ``script --child ARGS`` with ``env`` and return its JSON result;
    a failed child ends the benchmark with its standard error."""
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "--child", *map(str, args)],
        env=env, capture_output=True, text=True, cwd=tempfile.gettempdir(),
    )
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def standalone(doc: str, measure: Callable[..., dict], report: Callable[[dict], str],
               child: Callable[..., dict], child_args: int) -> None:
    """The module's own command line: ``--child`` runs the measuring child
    with its arguments, numbers as integers), otherwise measure against
    ``--lib`` and print the report."""
    if len(sys.argv) == child_args + 2 and sys.argv[1] == "--child":
        args = [int(a) if a.isdigit() else a for a in sys.argv[2:]]
        print(json.dumps(child(*args)))
        return
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--lib", default=str(ROOT / "native" / "build" / "liballocpolicy.so"),
                    help="runtime library to preload (default: the source tree's build)")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter loops")
    args = ap.parse_args()
    print(report(measure(Path(args.lib), quick=args.quick)))

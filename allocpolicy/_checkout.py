"""The runtime library of a source checkout: found, and built when missing or stale.

``python -m allocpolicy`` (and ``python -m pytest``) started in the root of a
checkout import the package from the checkout, not from the installation:
the current directory comes first on ``sys.path``. The checkout has no
``_lib/`` of its own; its library is ``native/build/``, which ``make -C
native`` and an editable install (``pip install -e .``) build. So that such a
command never runs with a library older than the C sources next to it, or
fails for want of one, the library is (re)built here, with the checkout's own
Makefile, whenever a source is newer than it.
"""

from __future__ import annotations

import os
import sys

from ._errors import RuntimeLoadError

# fcntl, shutil and subprocess are imported only when a build is due:
# subprocess imports threading, and interpreters started under the preload
# import this package at startup, where importing threading would change
# what their programs see (CPython's test_threading checks exactly that).

#: Longest a build may take on a loaded machine before it counts as failed.
BUILD_TIMEOUT = 600


def native_dir(package_dir: str) -> str | None:
    """``native/`` of the checkout the package at ``package_dir`` lives in,
    or None for an installed package."""
    candidate = os.path.join(os.path.dirname(package_dir), "native")
    if os.path.isfile(os.path.join(candidate, "Makefile")):
        return candidate
    return None


def _sources(native: str) -> list[str]:
    found = [os.path.join(native, "Makefile")]
    for sub in ("src", "include"):
        directory = os.path.join(native, sub)
        found += [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
    return found


def _stale(native: str, outputs: list[str]) -> bool:
    try:
        built = min(os.stat(path).st_mtime for path in outputs)
    except FileNotFoundError:
        return True
    return any(os.stat(path).st_mtime > built for path in _sources(native))


def library(package_dir: str, native: str, names: list[str]) -> str:
    """Path of ``names[0]`` in ``native/build/``, after building every one of
    ``names`` (the preload library and its in-process variant) if any is
    missing or older than a source."""
    build = os.path.join(native, "build")
    outputs = [os.path.join(build, name) for name in names]
    if not _stale(native, outputs):
        return os.path.realpath(outputs[0])
    import fcntl
    import shutil
    import subprocess

    where = (
        f"allocpolicy is imported from the source checkout {package_dir} (the current "
        "directory comes first on sys.path, so `python -m allocpolicy` run there uses "
        "the checkout, not an installed copy)"
    )
    make = shutil.which("make")
    if make is None or not (os.environ.get("CC") or shutil.which("cc")):
        raise RuntimeLoadError(
            f"{where}, and its runtime library {outputs[0]} is not built; building it "
            "needs `make` and a C compiler (`cc`), and this machine lacks "
            + ("make" if make is None else "cc")
            + "; install them, or run from another directory to use the installed package"
        )
    os.makedirs(build, exist_ok=True)
    # Several processes (pytest workers, parallel commands) may find the
    # library stale at once: one builds, the others wait and then see it fresh.
    with open(os.path.join(build, ".lock"), "wb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stale(native, outputs):
            print(f"allocpolicy: building the runtime library of the source checkout "
                  f"(make -C {native})", file=sys.stderr, flush=True)
            try:
                proc = subprocess.run(
                    [make, "-s", "-C", native], capture_output=True, text=True,
                    timeout=BUILD_TIMEOUT,
                )
            except subprocess.TimeoutExpired:
                raise RuntimeLoadError(
                    f"{where}; building its runtime library with `make -C {native}` took "
                    f"longer than {BUILD_TIMEOUT} s"
                ) from None
            if proc.returncode != 0 or _stale(native, outputs):
                raise RuntimeLoadError(
                    f"{where}; building its runtime library with `make -C {native}` failed "
                    f"(exit status {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
                )
    return os.path.realpath(outputs[0])

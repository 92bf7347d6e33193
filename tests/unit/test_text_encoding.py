"""Every text file the package opens names its encoding.

Without one, Python picks the locale's encoding, and under
``-X warn_default_encoding`` it warns: in every program started under the
runtime, since the package is imported at interpreter start. The scan reads
the package's source; tests/integration/test_startup.py runs a program under
the preload with the warning turned into an error.
"""

from __future__ import annotations

import ast
from pathlib import Path

import allocpolicy

PACKAGE = Path(allocpolicy.__file__).resolve().parent
# Path methods that open a text file.
TEXT_METHODS = {"read_text", "write_text"}


def _mode(call: ast.Call) -> str:
    if len(call.args) >= 2 and isinstance(call.args[1], ast.Constant):
        return str(call.args[1].value)
    for kw in call.keywords:
        if kw.arg == "mode" and isinstance(kw.value, ast.Constant):
            return str(kw.value.value)
    return "r"


def _opens_text_without_encoding(call: ast.Call) -> bool:
    func = call.func
    if any(kw.arg == "encoding" for kw in call.keywords):
        return False
    if isinstance(func, ast.Name) and func.id == "open":
        return "b" not in _mode(call) and len(call.args) < 4
    if isinstance(func, ast.Attribute):
        if func.attr in TEXT_METHODS:
            return not call.args  # read_text(encoding) passed positionally is fine
        if func.attr == "open" and not (isinstance(func.value, ast.Name) and func.value.id == "os"):
            # Path.open(mode) / io.open(file, mode)
            mode_index = 0 if not (isinstance(func.value, ast.Name) and func.value.id == "io") else 1
            mode = "r"
            if len(call.args) > mode_index and isinstance(call.args[mode_index], ast.Constant):
                mode = str(call.args[mode_index].value)
            return "b" not in mode
    return False


def test_no_text_open_without_an_encoding():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _opens_text_without_encoding(node):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, "text opened without an encoding:\n" + "\n".join(found)


def test_the_scan_finds_what_it_looks_for():
    # A scan that finds nothing because it cannot see would pass forever.
    def finds(source: str) -> bool:
        call = ast.parse(source).body[0].value
        return _opens_text_without_encoding(call)

    assert finds('open("/proc/self/maps")')
    assert finds('open(p, "w")')
    assert finds("p.read_text()")
    assert finds('p.open("r")')
    assert not finds('open(p, "rb")')
    assert not finds('open(p, encoding="ascii")')
    assert not finds('p.read_text(encoding="utf-8")')
    assert not finds("os.open(p, os.O_RDONLY)")

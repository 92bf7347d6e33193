"""Sphinx configuration of the allocpolicy documentation.

Build it with ``nox -s docs``, or directly::

    sphinx-build -W --keep-going -b html docs docs/_build/html

The API page is generated from the docstrings of the ``allocpolicy`` package.
An installed copy (``pip install .``) is used when there is one; otherwise the
package is imported from this checkout. Importing it needs neither the native
library nor the preload.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: an installed copy stays first on the path.
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import allocpolicy  # noqa: E402

project = "allocpolicy"
author = "allocpolicy developers"
copyright = "allocpolicy developers"
release = allocpolicy.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# The integrations import their frameworks, which the docs build need not
# install.
autodoc_mock_imports = ["flask", "werkzeug", "dask", "distributed", "starlette"]

root_doc = "index"
exclude_patterns = ["_build", "examples", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
highlight_language = "python3"
pygments_style = "friendly"

# -- autodoc / napoleon ---------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become :ivar: fields of the class, so they do not
# collide with attributes that autodoc documents on its own.
napoleon_use_ivar = True

# -- HTML -------------------------------------------------------------------------

html_theme = "furo"
html_title = f"allocpolicy {release}"
html_static_path = ["_static"]
# Long lines of code and of recorded output wrap instead of running off the
# right edge (the recorded outputs are compared with real runs, byte for byte,
# so they cannot be re-broken by hand).
html_css_files = ["wrap-code.css"]
html_show_sourcelink = False
pygments_dark_style = "monokai"

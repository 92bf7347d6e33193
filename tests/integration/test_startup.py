"""What every interpreter started under the runtime goes through: the
package imported at start (``_startup.pth``), the policy handed over by
``allocpolicy run`` or named in the environment, and the checks ``run``
makes before it starts the command."""

from __future__ import annotations

import os
import subprocess
import sys

from runtime_run import check, run_python

MODULES_POLICY = """
    version = 1
    [scopes.job]
    on_oom = "raise"
    budget = "64 MiB"
    modules = ["json"]
"""


def test_startup_opens_no_text_file_without_an_encoding(tmp_path):
    # GIVEN -X warn_default_encoding with EncodingWarning as an error, in the
    # command and in `allocpolicy run` itself
    strict = {"PYTHONWARNDEFAULTENCODING": "1", "PYTHONWARNINGS": "error::EncodingWarning"}
    code = """
        import sys, warnings
        import allocpolicy
        assert sys.flags.warn_default_encoding
        assert "allocpolicy" in sys.modules and allocpolicy.is_active()
        allocpolicy.active_policy()
        allocpolicy.machine_headroom()
        import json  # bound to the scope `job` by the policy
        print("ok")
    """
    # WHEN the package is imported at start and used
    proc = run_python(code, MODULES_POLICY, tmp_path, env=strict)
    # THEN nothing warned (a warning would be an error, and printed)
    assert check(proc).split() == ["ok"]
    assert "EncodingWarning" not in proc.stderr, proc.stderr

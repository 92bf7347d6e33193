"""Build glue: compile native/ into a plain shared library inside the package.

The library has no Python.h dependency and is loaded with ctypes, so the wheel
is tagged py3-none-<platform>: one wheel serves every Python >= 3.11.
"""

import os
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent


class BuildNative(build_py):
    """Run native/Makefile: into allocpolicy/_lib/ of the wheel, or for an
    editable install into native/build/, where the package imported from the
    checkout looks (allocpolicy/_checkout.py)."""

    def run(self):
        super().run()
        if self.editable_mode:
            # Incremental: the checkout's library, rebuilt only if a source changed.
            subprocess.check_call(["make", "-s", "-C", str(HERE / "native")])
            # An editable wheel holds what is in its unpacked directory (the
            # `install` command's install_lib) besides the link to the checkout.
            site_root = self.get_finalized_command("install").install_lib
        else:
            out = Path(self.build_lib, "allocpolicy", "_lib", "liballocpolicy.so").resolve()
            out.parent.mkdir(parents=True, exist_ok=True)
            subprocess.check_call(
                ["make", "-s", "-C", str(HERE / "native"), f"OUT={out}", "-B"],
                env={**os.environ},
            )
            site_root = self.build_lib
        # Interpreters started under `allocpolicy run` import the package at
        # startup (the line is a no-op elsewhere), so their small objects are
        # counted and an abort shows their Python traceback even if the
        # program never imports allocpolicy itself.
        self.copy_file(str(HERE / "allocpolicy" / "_startup.pth"),
                       str(Path(site_root, "allocpolicy-startup.pth")))


class PlatformWheel(bdist_wheel):
    """Platform-specific, but independent of the Python ABI."""

    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


class NativeDistribution(Distribution):
    def has_ext_modules(self):  # makes the wheel platform-specific
        return True


setup(
    cmdclass={"build_py": BuildNative, "bdist_wheel": PlatformWheel},
    distclass=NativeDistribution,
)

"""Everything is configured in pyproject.toml; this only ships csrc/ (the C++ sources of the CPU
extension, compiled on first use, never at install) inside the package as adaptive_cl/_csrc."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "adaptive_cl", "_csrc")
        os.makedirs(target, exist_ok=True)
        for name in sorted(os.listdir("csrc")):
            if name.endswith((".cpp", ".h", ".md")):
                shutil.copy2(os.path.join("csrc", name), target)


setup(cmdclass={"build_py": BuildPyWithCsrc})

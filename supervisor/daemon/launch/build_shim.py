"""The setuptools `build_ext` that also compiles `_shim.c` into the `trainsup-shim`
executable next to the `_spawn` extension (pyproject.toml names it in
[tool.setuptools.cmdclass]). Loaded by setuptools at build time from this file alone:
it imports nothing of trainsup.

Linked statically where the C library allows it (an exec with no dynamic loader, and the
pages of one file shared by every shim on the machine), else dynamically. Like the
extension it is optional: without a C compiler trainsup installs, and jobs are launched
without a shim (a daemon restart then ends and relaunches them; the daemon says so).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from setuptools.command.build_ext import build_ext

SHIM = "trainsup-shim"
SOURCE = Path("supervisor") / "daemon" / "launch" / "_shim.c"
_NEXT_TO = "trainsup.daemon.launch._spawn"


class BuildExt(build_ext):
    def run(self) -> None:
        super().run()
        self._build_shim()

    def _shim_path(self) -> str:
        return os.path.join(os.path.dirname(self.get_ext_fullpath(_NEXT_TO)), SHIM)

    def get_outputs(self) -> list[str]:
        out = list(super().get_outputs())
        if os.path.exists(self._shim_path()):
            out.append(self._shim_path())
        return out

    def _build_shim(self) -> None:
        target = self._shim_path()
        try:
            compiler: Any = self.compiler
            if compiler is None or isinstance(compiler, str):
                from setuptools._distutils.ccompiler import new_compiler
                from setuptools._distutils.sysconfig import customize_compiler
                compiler = new_compiler(compiler=compiler, force=self.force)
                customize_compiler(compiler)
            objects = compiler.compile([str(SOURCE)], output_dir=self.build_temp,
                                            extra_postargs=["-O2", "-Wall"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            for extra in (["-static"], []):
                try:
                    compiler.link_executable(objects, SHIM, output_dir=os.path.dirname(target),
                                                  extra_postargs=extra)
                    break
                except Exception:
                    if not extra:
                        raise
            os.chmod(target, 0o755)
        except Exception as e:      # no compiler: trainsup still installs (see the module doc)
            print(f"warning: {SHIM} not built ({e}); jobs will run without a shim", flush=True)

"""Build hook: ship `llamalab_lm_eval.pth` at the top of site-packages.

Everything else about the package is declared in pyproject.toml. This file exists only because a `.pth`
file must sit at the root of site-packages, which pyproject metadata cannot express; the `.pth` imports
`_llamalab_lm_eval` at start-up so that `lm_eval --model llamalab` works (see that module for why).
It is written both for regular wheels (into build_lib, which becomes site-packages) and for editable
installs (PEP 660: setuptools builds the editable wheel from its `install_lib` directory).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "llamalab_lm_eval.pth"
# One line, executed by `site` at start-up; it does nothing unless the hook module is importable.
PTH_LINE = (
    "import importlib.util as _u; "
    "_u.find_spec('_llamalab_lm_eval') is not None and __import__('_llamalab_lm_eval')\n"
)


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        targets = [Path(self.build_lib)]
        if getattr(self, "editable_mode", False):
            targets.append(Path(self.get_finalized_command("install").install_lib))
        for directory in targets:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / PTH_NAME).write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH_NAME)]


setup(cmdclass={"build_py": BuildPyWithPth})

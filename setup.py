"""Installs `mlx_diffusiongemma.pth` next to the package, in regular and editable
installs alike: it imports `_mlx_diffusiongemma_hook`, the finder that lets
mlx-lm load DiffusionGemma (see that module). Everything else is in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "mlx_diffusiongemma.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))


class editable_wheel_with_pth(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        strategy = super()._select_strategy(*args, **kwargs)

        class WithPth:
            def __enter__(self):
                strategy.__enter__()
                return self

            def __exit__(self, *exc):
                return strategy.__exit__(*exc)

            def __call__(self, wheel, files, mapping):
                strategy(wheel, files, mapping)
                with open(PTH) as f:
                    wheel.writestr(PTH, f.read())

        return WithPth()


setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})

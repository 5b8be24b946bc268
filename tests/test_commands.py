"""The commands take only what they run: converting or training a checkpoint
imports neither the generation loop, the sampler nor the kernels, and the
argument helpers import nothing of the package."""

import subprocess
import sys

import pytest

LOOP = {"mlx_diffusiongemma.generate", "mlx_diffusiongemma.sampling", "mlx_diffusiongemma.kernels", "mlx_diffusiongemma.generate.command"}


def _imported(module: str) -> set:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return {m for m in out.split() if m.startswith("mlx_diffusiongemma")}


@pytest.mark.parametrize("command", ["mlx_diffusiongemma.convert", "mlx_diffusiongemma.train"])
def test_commands_that_do_not_generate_import_no_generation(command):
    assert _imported(command) & LOOP == set()


def test_argument_helpers_import_nothing_of_the_package():
    import ast

    import mlx_diffusiongemma.arguments as arguments

    tree = ast.parse(open(arguments.__file__).read())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports and all(isinstance(n, ast.Import) or n.level == 0 for n in imports)
    assert all(not (n.module or "").startswith("mlx_diffusiongemma") for n in imports if isinstance(n, ast.ImportFrom))

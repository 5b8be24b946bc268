"""Installed as users install it: a regular wheel and an editable install,
each in a venv of its own. In both, `mlx_diffusiongemma.pth` imports the
mlx-lm finder at startup, so `mlx_lm.load` finds the model; the console
scripts are there; the kernels' sources are readable (inside the package
from a wheel, metal/ of the repository in an editable install); and
uninstalling removes the .pth.

Offline: pip builds with this environment's build backend (the test extra
has it) and installs nothing else; the new venvs see this environment's
packages (mlx, mlx-lm, ...) through a path-only .pth, which runs none of
this environment's own .pth files.
"""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {
    "mlx_diffusiongemma.generate": "mlx_diffusiongemma.generate.command:main",
    "mlx_diffusiongemma.convert": "mlx_diffusiongemma.convert:main",
    "mlx_diffusiongemma.train": "mlx_diffusiongemma.train:main",
    "mlx_diffusiongemma.lora": "mlx_diffusiongemma.lora:main",
    "mlx_diffusiongemma.demo": "mlx_diffusiongemma.demo:main",
    "mlx_diffusiongemma": "mlx_diffusiongemma.__main__:main",
}
PIP = (sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input")
OFFLINE = ("--no-deps", "--no-index", "--no-build-isolation", "-q")

# Runs in the new venv. The first line looks before anything else is imported.
PROBE = """\
import sys; started = "_mlx_diffusiongemma_hook" in sys.modules
import json
from importlib.metadata import distribution, entry_points
from pathlib import Path

import _mlx_diffusiongemma_hook
import mlx_diffusiongemma
import mlx_lm
from mlx_diffusiongemma import kernels

header, body = kernels.source("cuda")
model, _ = mlx_lm.load(str(Path(mlx_diffusiongemma.__file__).parent / "demo_model"))
print(json.dumps({
    "started": started,
    "package": mlx_diffusiongemma.__file__,
    "hook": _mlx_diffusiongemma_hook.__file__,
    "metal": sorted(p.name for p in kernels.sources().iterdir()),
    "kernels": "__syncthreads" in header and "row_uniform" in body,
    "model": type(model).__module__,
    "dist": str(distribution("mlx-diffusiongemma").locate_file("")),
    "record": "mlx_diffusiongemma.pth," in distribution("mlx-diffusiongemma").read_text("RECORD"),
    "scripts": {ep.name: ep.value for ep in entry_points(group="console_scripts")
                if ep.name.startswith("mlx_diffusiongemma") and callable(ep.load())},
}))
"""


def _run(*command, **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, command))[:200]}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def _venv(path: Path):
    """A venv without pip (pip runs from here with --python) that sees this
    environment's site-packages after its own."""
    _run(sys.executable, "-m", "venv", "--without-pip", str(path))
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").strip())
    ours = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (purelib / "zz_test_install_outer_site.pth").write_text("".join(f"{p}\n" for p in ours if os.path.isdir(p)))
    return python, purelib


@pytest.mark.parametrize("kind", ["wheel", "editable"])
def test_install_finds_the_model(tmp_path, kind):
    python, purelib = _venv(tmp_path / "venv")
    target = ("--python", str(python))
    if kind == "wheel":
        wheels = tmp_path / "wheels"
        _run(*PIP, "wheel", *OFFLINE, "-w", str(wheels), str(ROOT))
        (wheel,) = wheels.glob("mlx_diffusiongemma-*.whl")
        _run(*PIP, *target, "install", *OFFLINE, str(wheel))
        home = purelib  # everything is in the venv
    else:
        _run(*PIP, *target, "install", *OFFLINE, "-e", str(ROOT))
        home = ROOT  # the sources are used where they are
    assert (purelib / "mlx_diffusiongemma.pth").is_file()

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = json.loads(_run(str(python), "-c", PROBE, cwd=tmp_path, env=env))
    assert found["started"], "mlx_diffusiongemma.pth did not import the finder at startup"
    assert found["model"] == "mlx_diffusiongemma.mlx_lm_model"
    assert Path(found["package"]).is_relative_to(home / "mlx_diffusiongemma")
    assert Path(found["hook"]) == home / "_mlx_diffusiongemma_hook.py"
    assert {"row_sampler.body", "row_sampler.h", "metal_prelude.h", "cuda_prelude.h", "README.md"} <= set(found["metal"])
    assert Path(found["dist"]) == purelib and found["record"] and found["kernels"]
    assert found["scripts"] == SCRIPTS

    # The console scripts are installed, and run (the wrapper exits with main's return value).
    bindir = python.parent
    assert all((bindir / (name + (".exe" if os.name == "nt" else ""))).is_file() for name in SCRIPTS)
    usage = _run(str(bindir / "mlx_diffusiongemma.generate"), "--help", cwd=tmp_path, env=env)
    assert "--model" in usage

    # The .pth is in the RECORD, so uninstalling removes it (and every file the install wrote).
    _run(*PIP, *target, "uninstall", "-y", "-q", "mlx-diffusiongemma")
    left = sorted(p.name for p in purelib.iterdir() if p.name != "zz_test_install_outer_site.pth" and p.name != "__pycache__")
    assert left == [], left

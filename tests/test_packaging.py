"""The wheel holds the kernel library only (no top-level ``models``/``training`` to collide with users'
packages), and installed into a fresh environment it imports and runs a kernel."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _have_build_backend() -> bool:
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.timeout(180)
@pytest.mark.skipif(not _have_build_backend(), reason="setuptools is not installed (the build runs offline)")
def test_wheel_installs_only_triformer_and_runs_a_kernel(tmp_path):
    src = tmp_path / "src"  # a copy, so the build's egg-info and build/ never touch the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "runs", "outputs", "*.egg-info", "build", "dist",
                                                             "__pycache__", ".pytest_cache", ".hypothesis", "results"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, env=env, timeout=150)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"no offline build backend: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("triformer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"triformer", next(t for t in tops if t.endswith(".dist-info"))}, sorted(tops)
    assert "triformer/patch.py" in names and "triformer/attention.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, env=env, timeout=120)
    assert install.returncode == 0, install.stderr[-2000:]
    script = ("import torch, triformer; "
              "assert triformer.__file__.startswith(%r), triformer.__file__; "
              "x = torch.randn(3, 40); w = torch.randn(40); "
              "y = triformer.rms_norm(x, w, 1e-6); "
              "assert torch.allclose(y, triformer.rms_norm_reference(x, w, 1e-6), atol=1e-5); "
              "import importlib.util as u; "
              "assert u.find_spec('models') is None or not u.find_spec('models').origin.startswith(%r); "
              "print('ok', triformer.__version__)") % (str(venv), str(venv))
    env_run = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(py), "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env_run,
                         timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]

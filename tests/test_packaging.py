"""The wheel: its distribution name is ``triformer-kernels`` (PyPI's ``triformer`` is another project), it holds
the kernel library only (no top-level ``models``/``training`` to collide with users' packages) with its
``py.typed`` and licence, and installed on its own it imports and runs a kernel.

The install goes to a ``--target`` directory put first on ``PYTHONPATH`` and runs under this interpreter, so
torch and triton come from the environment the tests run in, whether that is a virtualenv or not (a venv made
from a virtualenv's python sees the base interpreter's packages, which may lack torch)."""
import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST_NAME = "triformer-kernels"


def _have_build_backend() -> bool:
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not _have_build_backend():
        pytest.skip("setuptools is not installed (the build runs offline)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy, so the build's egg-info and build/ never touch the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "runs", "outputs", "*.egg-info", "build", "dist",
                                                             "__pycache__", ".pytest_cache", ".hypothesis", "results",
                                                             "data_cache", ".whl", ".assets", "wandb", "multirun"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp / "dist"), str(src)], capture_output=True, text=True, env=env, timeout=150)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"no offline build backend: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-2000:]
    (path,) = (tmp / "dist").glob("*.whl")
    return path


@pytest.mark.timeout(180)
def test_wheel_metadata_names_triformer_kernels_and_holds_only_triformer(wheel):
    assert wheel.name.startswith("triformer_kernels-"), wheel.name
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    tops = {n.split("/")[0] for n in names}
    (dist_info,) = [t for t in tops if t.endswith(".dist-info")]
    assert tops == {"triformer", dist_info}, sorted(tops)
    metadata = email.message_from_bytes(archive.read(f"{dist_info}/METADATA"))
    assert metadata["Name"] == DIST_NAME
    assert metadata["License-Expression"] == "MIT"
    assert any(n.startswith(f"{dist_info}/licenses/LICENSE") for n in names), names
    assert {"triformer/patch.py", "triformer/attention.py", "triformer/py.typed"} <= set(names)


@pytest.mark.timeout(180)
def test_wheel_installs_alone_and_runs_a_kernel(wheel, tmp_path):
    target = tmp_path / "site"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                              "--target", str(target), str(wheel)], capture_output=True, text=True, env=env,
                             timeout=120)
    assert install.returncode == 0, install.stderr[-2000:]
    script = ("import importlib.metadata as md, torch, triformer; "
              "assert triformer.__file__.startswith(%r), triformer.__file__; "
              "assert md.version('triformer-kernels') == triformer.__version__; "
              "x = torch.randn(3, 40); w = torch.randn(40); "
              "y = triformer.rms_norm(x, w, 1e-6); "
              "assert torch.allclose(y, triformer.rms_norm_reference(x, w, 1e-6), atol=1e-5); "
              "import importlib.util as u; "
              "assert u.find_spec('models') is None or not u.find_spec('models').origin.startswith(%r); "
              "print('ok', triformer.__version__)") % (str(target), str(target))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                         env={**env, "PYTHONPATH": str(target)}, timeout=120)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]

"""``import triformer`` after something else imported triton (building a transformers model does): on a CPU the
error names the two things that work, and the second of them (``TRITON_INTERPRET=1`` from the start) does work."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's message (no CUDA device)")

TRITON_FIRST = ("import triton, torch; import triformer; x = torch.randn(3, 40); w = torch.randn(40); "
                "assert torch.allclose(triformer.rms_norm(x, w, 1e-6), triformer.rms_norm_reference(x, w, 1e-6), "
                "atol=1e-5); print('ok')")


def _run(env_update: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRIFORMER_INTERPRET")}
    return subprocess.run([sys.executable, "-c", TRITON_FIRST], capture_output=True, text=True, timeout=120,
                          env={**env, **env_update})


def test_triton_imported_first_says_what_works_on_a_cpu():
    result = _run({})
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "put `import triformer` before the import that loaded triton" in message, message
    assert "TRITON_INTERPRET=1 python" in message, message
    assert "TRIFORMER_INTERPRET=0" not in message  # compiling on a CPU fails at the first kernel instead


def test_triton_interpret_set_at_start_lets_triton_come_first():
    result = _run({"TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]

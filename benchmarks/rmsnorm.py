"""RMSNorm benchmark (GPU): ``python benchmarks/rmsnorm.py [--quick]``. It runs the same shapes, byte counts and
peers (eager ``F.rms_norm``, its torch.compile, Liger's LigerRMSNorm) as ``benchmarks/layernorm.py``, plus
the fused residual add + RMSNorm."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.layernorm import run  # noqa: E402

if __name__ == "__main__":
    run("rms", "rmsnorm")

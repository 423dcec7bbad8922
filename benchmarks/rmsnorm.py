"""RMSNorm benchmark (GPU): ``python -m benchmarks.rmsnorm [--quick]``. It runs the same shapes, byte counts and
peers (eager ``F.rms_norm``, its torch.compile, Liger's LigerRMSNorm) as ``benchmarks/layernorm.py``, plus
the fused residual add + RMSNorm."""


from benchmarks.layernorm import run

if __name__ == "__main__":
    run("rms", "rmsnorm")

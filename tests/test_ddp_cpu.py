"""Two processes (DDP or FSDP2 over gloo on CPU) train exactly like one process with the same global batch.

The two ranks start from the forkserver (see conftest) with the environment torchrun would give them;
``train.py`` under torchrun reads the same."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from training.config import compose
from training.trainer import train


def _overrides(run_dir, cache, kernels, *extra):
    # 4 steps of a global batch of 8: per rank 8 / 2 processes / 2 micro-steps = 2 sequences per micro-step
    return ["experiment=smoke", f"model.kernels={kernels}", "trainer.grad_accum=2", "trainer.max_steps=4",
            "trainer.eval_interval=2", "trainer.ckpt_interval=4", f"run_dir={run_dir}", f"data.cache_dir={cache}",
            "data.num_proc=1", *extra]


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in records if r["kind"] == "train"},
            {r["step"]: r["val/loss"] for r in records if r["kind"] == "eval"})


def _rank(rank, cfg, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train(cfg)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kernels, strategy", [("torch", "ddp"), ("triton", "ddp"), ("torch", "fsdp")])
def test_two_processes_match_one(tmp_path, kernels, strategy):
    cache = tmp_path / "cache"
    single = tmp_path / "single"
    train(compose(_overrides(single, cache, kernels)))
    multi = tmp_path / "multi"
    cfg = compose(_overrides(multi, cache, kernels, f"trainer.strategy={strategy}"))
    mp.start_processes(_rank, args=(cfg, _free_port()), nprocs=2, start_method="forkserver")
    (train_1, val_1), (train_2, val_2) = _losses(single), _losses(multi)
    assert sorted(train_2) == [1, 2, 3, 4] and sorted(val_2) == [2, 4]
    # the gradient all-reduce sums in another order: equal up to float32 rounding
    for step in train_1:
        assert train_2[step] == pytest.approx(train_1[step], rel=1e-5, abs=0)
    for step in val_1:
        assert val_2[step] == pytest.approx(val_1[step], rel=1e-5, abs=0)
    assert (multi / "checkpoints" / "step_00000004.safetensors").exists()
    assert not list(multi.glob("checkpoints/.*tmp*"))

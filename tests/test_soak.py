"""Soak: many small training steps through triformer's kernels show no growth in memory or step time.

CI runs 120 steps (a minute on the interpreter); the long run is
`TRIFORMER_SOAK_STEPS=3000 python -m pytest tests/test_soak.py`.
"""
import os
import statistics
import time

import torch

import models


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_many_steps_keep_memory_and_step_time_flat():
    steps = int(os.environ.get("TRIFORMER_SOAK_STEPS", "120"))
    model = models.create_model("gpt2-nano", kernels="triton", n_layer=1, n_head=2, n_embd=32, block_size=16,
                                vocab_size=97, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    times, rss = [], []
    for step in range(steps):
        tokens = torch.randint(0, 97, (2, 17), generator=gen)  # fresh batches: nothing may be cached per input
        start = time.perf_counter()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        assert torch.isfinite(loss)
        if step % 25 == 0:
            rss.append(resident_bytes())
    warm = steps // 4  # allocator pools, kernel caches and optimizer state settle in the first quarter
    first, last = statistics.median(times[warm:2 * warm]), statistics.median(times[-warm:])
    assert last < 2.0 * first, f"step time grew from {first * 1e3:.1f} ms to {last * 1e3:.1f} ms"
    settled = rss[len(rss) // 4]
    assert rss[-1] - settled < 32 << 20, f"resident memory grew by {(rss[-1] - settled) / 2**20:.1f} MiB"

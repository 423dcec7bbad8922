"""Does ``n_chunks`` change the cross-entropy's peak memory? One GPU, the GPT-2 small loss shape.

    python benchmarks/cross_entropy_chunks.py            # 16 x 1024 rows of 50304 bf16 logits

For each ``n_chunks``: the peak memory allocated by forward + backward above the logits themselves
(``torch.cuda.max_memory_allocated``), with the gradient in a fresh buffer and written over the logits
(``inplace_backward``), and the time of forward + backward (``triton.testing.do_bench`` median).
"""
from __future__ import annotations

import argparse

import triformer  # noqa: F401  (before triton: picks compile vs interpreter)
import torch
import triton.testing


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=16 * 1024)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--chunks", default="1,2,4,8,16")
    args = p.parse_args()
    targets = torch.randint(0, args.vocab, (args.rows,), device="cuda")
    print(f"logits {args.rows} x {args.vocab} bf16 = {args.rows * args.vocab * 2 / 2**30:.2f} GiB")
    for inplace in (False, True):
        for n in map(int, args.chunks.split(",")):
            def step():
                logits = torch.randn(args.rows, args.vocab, device="cuda", dtype=torch.bfloat16) * 1.0
                logits.requires_grad_()
                h = logits * 1.0  # an intermediate, which inplace_backward may consume
                triformer.cross_entropy(h, targets, n_chunks=n, inplace_backward=inplace).backward()
            step()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            ms = triton.testing.do_bench(step)
            print(f"inplace_backward={inplace} n_chunks={n}: peak {peak:.2f} GiB above what was allocated before "
                  f"(logits, their leaf's gradient and h included), step {ms:.2f} ms")


if __name__ == "__main__":
    main()

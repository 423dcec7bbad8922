#!/usr/bin/env bash
# The GPU plan of the open performance work (issues 22 and 24), in calls that each fit one device call
# (10 minutes); run from the repository root on the GPU machine, with .whl carried (see scripts/gpu_run.sh):
#   bash scripts/gpu_plan.sh 1   # correctness of the changed kernels on the GPU, then the cross-entropy sweep
#   bash scripts/gpu_plan.sh 2   # the GPT-2 training step (ce, fused loss, plain PyTorch) and where its time goes
#   bash scripts/gpu_plan.sh 3   # the bandwidth table (bf16), gelu_linear's time and memory and its sweep, float32 table
#   bash scripts/gpu_plan.sh 4   # patched models (tests and benchmark) and the compile tests, dynamic shapes included
#   bash scripts/gpu_plan.sh 5   # the ViT-B/16 step against plain PyTorch (gelu_linear's memory)
# Each call's results come back in $OUT/results.tar.gz (unpack into benchmarks/results/<card>/) and $OUT/log.txt.
# Between 1 and 2: set the constants the sweep chose (triformer/cross_entropy.py's TILE_BYTES, PROGRAMS_PER_SM,
# UNMASKED_WARPS, MASKED_WARPS); plan 3 runs the gelu sweep again for the backward that writes the activation
# (STORE_Y_PROGRAMS_PER_SM in triformer/gelu.py).
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  1) GPU_RUN_DEADLINE=560 BENCH_TIMEOUT=200 PY_TIMEOUT=330 bash scripts/gpu_run.sh \
       py "-m pytest -q -x -n 8 -p no:cacheprovider tests/test_cross_entropy.py tests/test_layernorm.py tests/test_gelu.py tests/test_attention.py tests/test_double_backward.py tests/test_linear_cross_entropy.py" \
       bench "cross_entropy --sweep" ;;
  2) GPU_RUN_DEADLINE=560 BENCH_TIMEOUT=330 bash scripts/gpu_run.sh \
       bench "train_step gpt --variants (ce),fused,plain --compile (ce),fused,plain --compile-modes reduce-overhead --steps 10 --warmup 3" \
       bench "profile_step --variants (ce),plain --modes compile:reduce-overhead" ;;
  3) GPU_RUN_DEADLINE=560 BENCH_TIMEOUT=200 bash scripts/gpu_run.sh \
       bench "bandwidth" bench "gelu_linear" bench "gelu --sweep" bench "bandwidth --fp32" ;;
  4) GPU_RUN_DEADLINE=560 BENCH_TIMEOUT=240 PY_TIMEOUT=300 TRIFORMER_SLOW_TESTS=1 bash scripts/gpu_run.sh \
       py "-m pytest -q -n 8 -p no:cacheprovider tests/test_patch.py tests/test_compile.py -k gpu" \
       bench "patch_llama --quick" ;;
  5) GPU_RUN_DEADLINE=560 BENCH_TIMEOUT=400 bash scripts/gpu_run.sh \
       bench "train_step vit --variants =triformer,plain --compile =triformer,plain --compile-modes reduce-overhead --steps 10 --warmup 3" ;;
  *) echo "usage: bash scripts/gpu_plan.sh 1|2|3|4|5" >&2; exit 2 ;;
esac

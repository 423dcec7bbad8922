#!/usr/bin/env bash
# The GPU plan of the open performance work (issues 22 and 24), in calls that each fit one device call
# (10 minutes), most important first, since a session's 30 minutes of device time hold about three of them;
# run from the repository root on the GPU machine, with .whl carried (see scripts/gpu_run.sh):
#   bash scripts/gpu_plan.sh 1   # the changed kernels' tests on the GPU, the GPT-2 step (fused loss vs plain
#                                # PyTorch, both compile modes) and where the step's time goes
#   bash scripts/gpu_plan.sh 2   # the bandwidth table (bf16), gelu_linear's time and memory, the ViT-B/16 step
#   bash scripts/gpu_plan.sh 3   # patched models (tests and benchmark) and the compile tests, dynamic shapes included
#   bash scripts/gpu_plan.sh 4   # the sweeps (cross-entropy, gelu) and the float32 bandwidth table
# Each call's results come back in $OUT/results.tar.gz (unpack into benchmarks/results/<card>/) and $OUT/log.txt.
# The sweeps set triformer/cross_entropy.py's TILE_BYTES, PROGRAMS_PER_SM, UNMASKED_WARPS, MASKED_WARPS and
# triformer/gelu.py's BIAS_PROGRAMS_PER_SM and STORE_Y_PROGRAMS_PER_SM.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  1) GPU_RUN_DEADLINE=570 BENCH_TIMEOUT=260 PY_TIMEOUT=150 bash scripts/gpu_run.sh \
       py "-m pytest -q -x -n 8 -p no:cacheprovider tests/test_cross_entropy.py tests/test_gelu_linear.py tests/test_linear_cross_entropy.py tests/test_fused_add_norm.py tests/test_attention.py tests/test_double_backward.py" \
       bench "train_step gpt --variants fused,plain --compile fused,plain --compile-modes default,reduce-overhead --steps 10 --warmup 3" \
       bench "profile_step --variants fused,plain --modes compile:reduce-overhead" ;;
  2) GPU_RUN_DEADLINE=570 BENCH_TIMEOUT=240 bash scripts/gpu_run.sh \
       bench "bandwidth" bench "gelu_linear" \
       bench "train_step vit --variants =triformer,plain --compile =triformer,plain --compile-modes reduce-overhead --steps 10 --warmup 3" ;;
  3) GPU_RUN_DEADLINE=570 BENCH_TIMEOUT=240 PY_TIMEOUT=300 TRIFORMER_SLOW_TESTS=1 bash scripts/gpu_run.sh \
       py "-m pytest -q -n 8 -p no:cacheprovider tests/test_patch.py tests/test_compile.py -k gpu" \
       bench "patch_llama --quick" ;;
  4) GPU_RUN_DEADLINE=570 BENCH_TIMEOUT=200 bash scripts/gpu_run.sh \
       bench "cross_entropy --sweep" bench "gelu --sweep" bench "bandwidth --fp32" ;;
  *) echo "usage: bash scripts/gpu_plan.sh 1|2|3|4" >&2; exit 2 ;;
esac

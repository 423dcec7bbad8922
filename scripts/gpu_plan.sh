#!/usr/bin/env bash
# The GPU plan of the open performance work (issues 22 and 24), in calls that each fit one device call
# (10 minutes), most important first, since a session's 30 minutes of device time hold about three of them;
# run from the repository root on the GPU machine, with .whl carried (see scripts/gpu_run.sh):
#   bash scripts/gpu_plan.sh 1   # the GPT-2 step, (ce) and fused loss against plain PyTorch in both compile modes
#                                # (whole-buffer kernels: is compiled triformer now as fast as eager? does the fused
#                                # loss's reduce-overhead step run?), and the compiled (ce) step's profile
#   bash scripts/gpu_plan.sh 2   # the changed kernels' GPU tests, the bandwidth table (bf16), gelu_linear's time and
#                                # memory and the GELU sweep (its backward that writes the activation)
#   bash scripts/gpu_plan.sh 3   # patched models (tests and benchmark) and the compile tests, dynamic shapes included
#   bash scripts/gpu_plan.sh 4   # the ViT-B/16 step, the cross-entropy sweep and the float32 bandwidth table
#   bash scripts/gpu_plan.sh 5   # the GPU compile and patch tests, the patched Qwen3 and Gemma (plan 3 has Llama
#                                # alone), and the fused-loss GPT-2 step's profile
#   bash scripts/gpu_plan.sh 6   # the GPU tests that failed on the H100 before 31b7f86 (bool masks in a compiled HF
#                                # model, cross-entropy between pointwise glue, the full models), by name (-v); the
#                                # fused loss's chunk-budget sweep (what the fused step's chunked cross-entropy costs)
#   bash scripts/gpu_plan.sh 7   # the GPT-2 step's compiled rows again ((ce), fused, plain), then where the fused
#                                # loss's time goes per chunk (--profile)
#   bash scripts/gpu_plan.sh 8   # the GPU compile tests plan 6 failed or did not reach (max-autotune aside) and those of
#                                # what only llama-small uses (grouped-query attention, add + RMSNorm, glu_linear),
#                                # with tracebacks and durations; where the patched and the unpatched compiled HF
#                                # Llama hold their memory at the step's peak (--profile); glu_linear's benchmark
#   bash scripts/gpu_plan.sh 9   # plan 8's profile alone (under 3 minutes, for a session's last device minutes)
# Each call's results come back in $OUT/results.tar.gz (unpack into benchmarks/results/<card>/) and $OUT/log.txt.
# The sweeps set triformer/cross_entropy.py's TILE_BYTES, PROGRAMS_PER_SM, UNMASKED_WARPS, MASKED_WARPS and
# triformer/gelu.py's BIAS_PROGRAMS_PER_SM and STORE_Y_PROGRAMS_PER_SM.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  1) GPU_RUN_DEADLINE=580 BENCH_TIMEOUT=440 bash scripts/gpu_run.sh \
       bench "train_step gpt --variants (ce),fused,plain --compile (ce),fused,plain --compile-modes default,reduce-overhead --steps 10 --warmup 3" \
       bench "profile_step --variants (ce) --modes compile" ;;
  2) GPU_RUN_DEADLINE=575 BENCH_TIMEOUT=200 PY_TIMEOUT=150 bash scripts/gpu_run.sh \
       py "-m pytest -v -n 8 -p no:cacheprovider tests/test_attention.py tests/test_cross_entropy.py tests/test_layernorm.py" \
       bench "bandwidth" bench "gelu_linear" bench "gelu --sweep" ;;
  3) GPU_RUN_DEADLINE=575 BENCH_TIMEOUT=240 PY_TIMEOUT=300 TRIFORMER_SLOW_TESTS=1 bash scripts/gpu_run.sh \
       py "-m pytest -v -n 8 -p no:cacheprovider tests/test_patch.py tests/test_compile.py -k gpu" \
       bench "patch_llama --quick" ;;
  4) GPU_RUN_DEADLINE=575 BENCH_TIMEOUT=200 bash scripts/gpu_run.sh \
       bench "train_step vit --variants =triformer,plain --compile =triformer,plain --compile-modes reduce-overhead --steps 10 --warmup 3" \
       bench "cross_entropy --sweep" bench "bandwidth --fp32" ;;
  5) GPU_RUN_DEADLINE=570 BENCH_TIMEOUT=230 PY_TIMEOUT=270 TRIFORMER_SLOW_TESTS=1 bash scripts/gpu_run.sh \
       py "-m pytest -v -n 8 -p no:cacheprovider tests/test_patch.py tests/test_compile.py -k gpu" \
       bench "patch_llama --only qwen3,gemma --steps 3 --warmup 2" \
       bench "profile_step --variants fused --modes compile" ;;
  6) GPU_RUN_DEADLINE=575 PY_TIMEOUT=400 BENCH_TIMEOUT=160 TRIFORMER_SLOW_TESTS=1 bash scripts/gpu_run.sh \
       py "-m pytest -v -n 8 -p no:cacheprovider tests/test_patch.py::test_compile_modes_gpu tests/test_compile.py::test_compile_full_model_on_gpu tests/test_compile.py::test_compile_each_op_on_gpu_matches_eager" \
       bench "linear_cross_entropy --sweep" ;;
  7) GPU_RUN_DEADLINE=575 BENCH_TIMEOUT=330 bash scripts/gpu_run.sh \
       bench "train_step gpt --variants (ce),fused,plain --eager none --compile (ce),fused,plain --compile-modes reduce-overhead,default --steps 10 --warmup 3" \
       bench "linear_cross_entropy --profile" ;;
  8) GPU_RUN_DEADLINE=575 PY_TIMEOUT=300 BENCH_TIMEOUT=240 TRIFORMER_SLOW_TESTS=1 bash scripts/gpu_run.sh \
       py "-m pytest -v -n 3 -p no:cacheprovider --tb=short --durations=0 tests/test_compile.py::test_compile_full_model_on_gpu[llama-small-default] tests/test_compile.py::test_compile_full_model_on_gpu[llama-small-reduce-overhead] tests/test_compile.py::test_compile_full_model_on_gpu[gpt2-small:fused-default] tests/test_compile.py::test_compile_full_model_on_gpu[vit-base-default] tests/test_compile.py::test_compile_each_op_on_gpu_matches_eager[linear_cross_entropy] tests/test_compile.py::test_compile_each_op_on_gpu_matches_eager[glu_linear] tests/test_compile.py::test_compile_each_op_on_gpu_matches_eager[attention_gqa] tests/test_compile.py::test_compile_each_op_on_gpu_matches_eager[add_rms_norm]" \
       bench "patch_llama --only llama --variants triformer,unpatched --modes compile --steps 3 --warmup 2 --profile" \
       bench "glu_linear" ;;
  9) GPU_RUN_DEADLINE=165 BENCH_TIMEOUT=160 bash scripts/gpu_run.sh \
       bench "patch_llama --only llama --variants triformer,unpatched --modes compile --steps 3 --warmup 2 --profile" ;;
  *) echo "usage: bash scripts/gpu_plan.sh 1|2|3|4|5|6|7|8|9" >&2; exit 2 ;;
esac

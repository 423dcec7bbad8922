#!/usr/bin/env bash
# Runs on the lent GPU machine (no network): installs the wheels carried in .whl/, then runs whatever
# steps are named: `tests` (the op test suite, compiled), `bench OP...` (python3 -m benchmarks.OP, from the repository root), or any
# `python ...` script given after `py`. Everything lands in $OUT/results.tar.gz plus $OUT/log.txt.
# The GPU image lacks these; fetch them once into .whl/ (git-ignored) and carry .whl with the call:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5 pytest pluggy iniconfig pygments hypothesis \
#     sortedcontainers pytest-xdist execnet packaging hydra-core omegaconf==2.3.1 pyyaml
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# (and .assets/gpt2.tiktoken from scripts/fetch_gpt2_bpe.sh for GPT-2 BPE runs).
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export TRIFORMER_BENCH_OUT=/tmp/results
mkdir -p $TRIFORMER_BENCH_OUT
run_steps() {
  local n=0
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  while [ $# -gt 0 ]; do
    case "$1" in
      tests) shift  # one file at a time, each under its own time limit, so one hang costs one file
        for f in $1; do echo "== $f"; timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -x -n 8 -p no:cacheprovider $f 2>&1 | tail -12; done
        shift ;;
      bench) shift; echo "== bench $1"; read -r op args <<< "$1"; n=$((n + 1))  # "layernorm --quick": script, flags
        timeout ${BENCH_TIMEOUT:-300} python3 -m benchmarks.$op $args 2>&1 | tee $TRIFORMER_BENCH_OUT/bench-$n-$op.txt | tail -60
        shift ;;
      # the whole output of a py or bench step also goes to results (py-N.txt, bench-N-OP.txt): a step killed at
      # its time limit loses pytest's summary,
      # but `-v` lines name every test that finished, and failures are in there
      py) shift; echo "== $1"; n=$((n + 1))
        timeout ${PY_TIMEOUT:-500} python3 $1 2>&1 | tee $TRIFORMER_BENCH_OUT/py-$n.txt | tail -80; shift ;;
      *) echo "unknown step $1"; shift ;;
    esac
    tar czf $OUT/results.tar.gz -C $TRIFORMER_BENCH_OUT .  # after every step: a call cut short keeps what ran
  done
}
# The whole run stops at GPU_RUN_DEADLINE seconds so the results are still packed inside the device call's limit.
export -f run_steps
timeout ${GPU_RUN_DEADLINE:-540} bash -c 'run_steps "$@"' _ "$@" 2>&1 | tee $OUT/log.txt
tar czf $OUT/results.tar.gz -C $TRIFORMER_BENCH_OUT .

#!/usr/bin/env bash
# The GPU checks and measurements in one call, for a lent GPU, in order of value per second:
#   1. env: the GPU, torch and triton versions, whether pytest is there;
#   2. kernel_tests: the Triton kernels' CUDA tests against float64, HyperGLU's and the HC/mHC streams', T <= 4096;
#   3. core: the attention core at the 124M width (bf16, B=8, T = 1024 and 4096): SDPA (pinned to flash), the cost
#      model's flash baseline (scripts/flash_baseline.py), HyperGLU's Triton kernels and its chunked torch form
#      (what HYPERGLU_TRITON=0 runs), side by side in one table;
#   4. streams, streams_compiled: the 12 x 768 step at T=1024 with softmax, plain / HC / mHC, eager then compiled;
#   5. step: the compiled 12 x 768 step, softmax against HyperGLU;
#   6. core_long, long_test: the core at B=1, T=16384, and the kernels' decoding and long-context test;
#   7. the rest, in whatever time the stages above leave: the compiled reference streams (model.py's forms), and
#      the other CUDA tests (tests/model/test_cuda.py).
# The limits of stages 1-6 add up to the budget (BUDGET_S, 450 s; LIMIT_SCALE multiplies the limits); a stage is cut to the time left, `timeout -k 10`
# kills it (TERM, then KILL 10 s later), and a stage with under 20 s left is skipped. bench.py rewrites its tables
# (NAME.md, NAME.json) after every measured row, so a stage that is cut short keeps what it measured.
# Everything goes to the folder given as $1, else $OUT, else ./gpu_check: NAME.log per stage, the tables, and
# summary.md (stage, exit code, seconds), which is also printed at the end.
#   bash scripts/gpu_check.sh [out_dir]
# A dry run of every stage on the CPU at toy sizes (the CUDA tests skip; EXTRA's --key=value come last and win;
# tests/scripts/test_gpu_check.py runs it):
#   DEVICE=cpu DTYPE=float32 EXTRA="--batch_size=1 --n_embd=32 --n_head=2 --model_layers=1 --model_embd=32 \
#       --model_heads=2 --model_T=16 --T_list=32 --repeats=1 --warmup=0 --compile=False" bash scripts/gpu_check.sh /tmp/g
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
py=${PYTHON:-python3}
mkdir -p "$out"
budget=${BUDGET_S:-450}
scale=${LIMIT_SCALE:-1}  # every stage's limit times this (a dry run on a slow CPU)
start=$(date +%s)
echo "| stage | exit code | seconds |" > "$out/summary.md"
echo "|---|---|---|" >> "$out/summary.md"

stage() {  # stage NAME SECONDS command...: run it within its limit and the budget, log to NAME.log, a summary row
    local name=$1 limit=$(($2 * scale))
    shift 2
    local left=$((budget - ($(date +%s) - start)))
    if [ "$left" -lt 20 ]; then
        echo "| $name | skipped (budget spent) | 0 |" >> "$out/summary.md"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s)"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && rc="$rc (time limit)"
    echo "| $name | $rc | $(($(date +%s) - t0)) |" >> "$out/summary.md"
    tail -n 25 "$out/$name.log"
}

bench() {  # bench NAME SECONDS args...: bench.py, its tables in NAME.md and NAME.json as rows are measured
    local name=$1 limit=$2
    shift 2
    # shellcheck disable=SC2086
    stage "$name" "$limit" "$py" bench.py --device="${DEVICE:-cuda}" --dtype="${DTYPE:-bfloat16}" \
        --json="$out/$name.json" --md="$out/$name.md" "$@" ${EXTRA:-}
}

rest() {  # the time the budget has left (in unscaled seconds)
    echo $(((budget - ($(date +%s) - start)) / scale))
}

width=(--n_embd=768 --n_head=12 --hyper_heads=2 --model_layers=12)
model=(--sections=model --compile=True --batch_size=8 --model_layers=12 --model_embd=768 --model_heads=12
       --model_T=1024 --repeats=5)
stage env 20 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true;
    $py -c 'import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)';
    $py -c 'import pytest; print(\"pytest\", pytest.__version__)' || echo 'pytest: not installed';
    git log -1 --format='commit %H %s' 2>/dev/null || true"
stage kernel_tests 120 "$py" -m pytest -q --maxfail=3 tests/model/test_cuda.py -k "(triton or stream) and not long_context"
bench core 60 --sections=core --batch_size=8 "${width[@]}" --T_list=1024,4096 --repeats=5
bench streams 30 "${model[@]}" --compile=False --attns=softmax --residuals=plain,hc,mhc
bench streams_compiled 80 "${model[@]}" --attns=softmax --residuals=plain,hc,mhc
bench step 80 "${model[@]}" --attns=softmax,hyperglu --residuals=plain
bench core_long 30 --sections=core --batch_size=1 "${width[@]}" --T_list=16384 --repeats=3
stage long_test 30 "$py" -m pytest -q tests/model/test_cuda.py -k long_context
bench streams_reference "$(rest)" "${model[@]}" --attns=softmax --residuals=plain,hc,mhc --impl=reference
stage other_tests "$(rest)" "$py" -m pytest -q --maxfail=3 tests/model/test_cuda.py -k "not triton and not stream"
cat "$out/summary.md"

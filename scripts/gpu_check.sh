#!/usr/bin/env bash
# The GPU checks and measurements in one call, for a lent GPU (sized to stay under 8 minutes on a bare H200):
#   1. the Triton kernels' CUDA tests (bf16 and fp32 against float64 at T = 1024 and 4096, decoding, T = 16384);
#   2. the attention core against SDPA/flash at the 124M width (bf16, B=8, T = 1024 and 4096), one whole layer's
#      time and peak memory at T=4096, and the core at B=1, T=16384;
#   3. the compiled 12 x 768 model step, T=1024: softmax against HyperGLU, then plain / HC / mHC with softmax
#      (fast kernels, the compiled reference forms, and CUDA graphs through torch.compile's reduce-overhead);
#   4. the rest of tests/model/test_cuda.py.
# Each stage has its own time limit and is skipped once the budget is spent, so a slow stage cannot eat the rest.
# Everything goes to the folder given as $1, else $OUT, else ./gpu_check: a log per stage, the bench tables as
# markdown (*.md) and JSON (*.json), and summary.md (stage, exit code, seconds).
#   bash scripts/gpu_check.sh [out_dir]
# A dry run of the same stages on the CPU at toy sizes (the CUDA tests skip; later --key=value win):
#   DEVICE=cpu DTYPE=float32 EXTRA="--batch_size=1 --n_embd=32 --n_head=2 --model_layers=1 --model_embd=32 \
#       --model_heads=2 --model_T=16 --T_list=32 --repeats=1" bash scripts/gpu_check.sh /tmp/gpu_check
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
budget=${BUDGET_S:-450}
start=$(date +%s)
echo "| stage | exit code | seconds |" > "$out/summary.md"
echo "|---|---|---|" >> "$out/summary.md"

stage() {  # stage NAME SECONDS command...: run it with a limit, log to NAME.log, one summary row
    local name=$1 limit=$2
    shift 2
    local left=$((budget - ($(date +%s) - start)))
    if [ "$left" -lt 20 ]; then
        echo "| $name | skipped (budget spent) | 0 |" >> "$out/summary.md"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s)"
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "| $name | $rc | $(($(date +%s) - t0)) |" >> "$out/summary.md"
    tail -n 25 "$out/$name.log"
}

bench() {  # bench NAME SECONDS args...: bench.py with its tables also as NAME.json, the markdown as NAME.md
    local name=$1 limit=$2
    shift 2
    # shellcheck disable=SC2086
    stage "$name" "$limit" python bench.py --device="${DEVICE:-cuda}" --dtype="${DTYPE:-bfloat16}" \
        --json="$out/$name.json" "$@" ${EXTRA:-}
    grep -E '^(###|\|)' "$out/$name.log" > "$out/$name.md" 2>/dev/null
}

stage env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true;
    python -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__)";
    git log -1 --format="commit %H %s" 2>/dev/null || true'
stage kernel_tests 150 python -m pytest -q -x tests/model/test_cuda.py -k triton
bench core 60 --sections=core --batch_size=8 --n_embd=768 --n_head=12 --hyper_heads=2 --model_layers=12 \
    --T_list=1024,4096 --repeats=5
bench layer 60 --sections=layer --batch_size=8 --n_embd=768 --n_head=12 --hyper_heads=2 --T_list=4096 --repeats=3
bench core_long 45 --sections=core --batch_size=1 --n_embd=768 --n_head=12 --hyper_heads=2 --model_layers=12 \
    --T_list=16384 --repeats=3
common=(--sections=model --compile=True --batch_size=8 --model_layers=12 --model_embd=768 --model_heads=12
        --model_T=1024 --repeats=5)
bench step 120 "${common[@]}" --attns=softmax,hyperglu --residuals=plain
bench streams 120 "${common[@]}" --attns=softmax --residuals=plain,hc,mhc
bench streams_reference 90 "${common[@]}" --attns=softmax --residuals=plain,hc,mhc --impl=reference
bench streams_graphs 90 "${common[@]}" --attns=softmax --residuals=plain,hc,mhc --compile_mode=reduce-overhead
stage other_tests 150 python -m pytest -q tests/model/test_cuda.py -k "not triton"
cat "$out/summary.md"

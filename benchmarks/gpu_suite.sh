#!/usr/bin/env bash
# Every GPU benchmark of docs/performance.md in one run (about 4 minutes on one H100):
#   OUT=results/ bash benchmarks/gpu_suite.sh
# Each part writes its own log under $OUT and a failed part does not stop the others. With a wheel
# folder (WHEELS=dir), the transformers version the CPU tests ran with is installed first (no network).
set -u
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kd_site   "$WHEELS"/*.whl && python3 -c "import sys; sys.path.insert(0, '/tmp/kd_site'); import transformers"   && export PYTHONPATH=/tmp/kd_site:$PYTHONPATH
fi
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

PARTS=${PARTS:-kd_check kd_loss gpu_check gpu_check_bf16_master}  # a subset runs only those parts
part() {  # part NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.txt, report the exit status
  local name=$1 limit=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0;; esac
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1; local rc=$?
  echo "== $name: exit $rc"; grep -E '^\||out of memory|Error' "$OUT/$name.txt" | tail -20
}

# 0. The chunked loss's accuracy in bf16: loss and gradients against the full path in fp32.
part kd_check 60 python3 benchmarks/bench_kd_loss.py --device cuda --dtype bfloat16 --hidden 2560 --teacher-hidden 4096 --check-grads 1024
# 1. Output layer + KD/CE loss, full logits vs chunked: the paper pair's widths (student 2560, teacher 4096).
part kd_loss 150 python3 benchmarks/bench_kd_loss.py --device cuda --dtype bfloat16 --hidden 2560 --teacher-hidden 4096 --seq-lens 1024 4096 16384 --reps 5 --warmup 2
# 2. Training steps at trunc 1.0 and 0.5 at realistic widths (Qwen3-4B / 8B, 12 layers each), 4096-token
#    sequences, chunked and full loss; then a profile of the chunked trunc-0.5 step. (bench_trunc_step.py
#    is left out: the embedded task's ~150-token sequences leave an H100 waiting on kernel launches.)
part gpu_check 240 python3 benchmarks/gpu_check.py --loss-impl chunked full --steps 8 --warmup 2 --profile 0.5
# 3. The same chunked step with the old pure-bf16 student (bf16 weights and AdamW states), against
#    part 2's fp32 master weights: what fp32 masters cost in time and memory.
part gpu_check_bf16_master 120 python3 benchmarks/gpu_check.py --master-weights bf16 --steps 8 --warmup 2

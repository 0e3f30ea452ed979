#!/usr/bin/env bash
# The GPU table (README "Training throughput"): one prepared script, one GPU, at most ~8 minutes.
#
#   bash benchmarks/gpu_table.sh [OUT_DIR]        (default outputs/gpu_table; needs a CUDA GPU)
#
# Runs benchmarks/bench_train_step.py at paper size for Stage C 12x12 (per-GPU batch 96, the 16-GPU
# phase), Stage C 24x24 (batch 24, the 64-GPU phase) and Stage B at 512 px, ours against the
# official-style loop, without and with torch.compile; then benchmarks/gpu_energy.py (the NVML energy
# counter against board power x time); then benchmarks/gpu_table.py writes gpu_table.json and the
# markdown table for the README. Each run has its own time limit, so one slow run cannot eat the budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_table}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$OUT"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_table.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False); run it on a GPU node" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true
start=$(date +%s)
run() {  # name, time limit (s), bench_train_step arguments...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - start ))s elapsed)"
  timeout "$limit" "$PY" benchmarks/bench_train_step.py --config paper --device cuda --json "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1 || echo "   $name: exit $? (see $OUT/$name.log)"
  tail -n 12 "$OUT/$name.log"
}
run c12         70  --stage c --latent 12 --batch 96 --steps 8 --warmup 3
run c24         70  --stage c --latent 24 --batch 24 --steps 8 --warmup 3
run b512        80  --stage b --batch 8 --steps 6 --warmup 2
run c12_compile 100 --stage c --latent 12 --batch 96 --steps 8 --warmup 5 --compile --reference none
run c24_compile 100 --stage c --latent 24 --batch 24 --steps 8 --warmup 5 --compile --reference none
run b512_compile 100 --stage b --batch 8 --steps 6 --warmup 4 --compile --reference none
echo "== energy ($(( $(date +%s) - start ))s elapsed)"
timeout 60 "$PY" benchmarks/gpu_energy.py --seconds 30 --json "$OUT/energy.json" 2>&1 | tail -n 8
"$PY" benchmarks/gpu_table.py "$OUT" | tee "$OUT/gpu_table.md"
echo "gpu_table.sh: done in $(( $(date +%s) - start ))s; $OUT/gpu_table.json, $OUT/gpu_table.md"

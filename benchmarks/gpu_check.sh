#!/usr/bin/env bash
# Issue 29's GPU checks in one go, from the repository root: at most 8 minutes (the steps'
# timeouts add up to 480 s, plus start-up).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # results under $OUT (default: gpu_check_out)
#
# 1. the GPU-only tests: the sparse kinds run Pallas at T=4096 and cuDNN at T=1024 and match
#    their references; cuDNN's dot_product (tests/test_sparse_dispatch.py, tests/test_attention.py)
# 2. benchmarks/attention.py at T = 16k and 64k, bfloat16, 12 heads x 64, window 512, window_topk
#    top_k 8 of 128-blocks, against dot_product and dense, plus the KV-cached decode step at 16k
#    and 64k. Bars (fwd_bwd speed-up over dot_product): window >= 4x at 16k, >= 12x at 64k;
#    window_topk >= 3x at 16k, >= 6x at 64k
# 3. the configs/long_gpu.py train step (T = 16k), window against dot_product. Bar: >= 2x
# 4. the short-T threshold (sparse_dispatch.FUSED_DENSE_MAX_T = 2048, a placeholder): each
#    implementation forced at T = 1k, 2k, 4k, 8k
# Each step has its own timeout, so one that hangs costs only its share; the summary at the end
# prints every bar as PASS/FAIL. Nothing here changes the repository except benchmarks/results/
# (train_step.py writes there; a copy goes to $OUT). GPU_CHECK_QUICK=1: the same steps at toy
# sizes, a smoke test of this script on a CPU (its figures mean nothing).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SIZES=(--seq-lens 16384,65536 --repeats 5 --decode-lens 16384,65536)
CONFIG=configs/long_gpu.py
SWEEP=(--seq-lens 1024,2048,4096,8192 --repeats 5)
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  SIZES=(--quick)
  CONFIG=configs/tiny.py
  SWEEP=(--quick --seq-lens 128 --heads 2 --head-dim 16)
fi
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
step() {   # step NAME SECONDS COMMAND...: runs it with a timeout, logs, records the exit status
  local name=$1 seconds=$2
  shift 2
  echo "=== $name ($(date +%T), timeout ${seconds}s): $*" | tee -a "$LOG"
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc" | tee -a "$LOG"
}

"$PY" -c 'import jax; print(jax.__version__, jax.devices())' 2>&1 | tee -a "$LOG"
step tests 90 "$PY" -m pytest -q -rs tests/test_sparse_dispatch.py tests/test_attention.py -k gpu
step attention 150 "$PY" benchmarks/attention.py "${SIZES[@]}" --out-dir "$OUT"
step train_step 180 "$PY" benchmarks/train_step.py --config "$CONFIG" --depths '' \
  --variants bfloat16_unrolled_window,bfloat16_unrolled_dot_product --repeats 4 \
  --steps_per_timing 3 --tag gpu_check
cp benchmarks/results/train_step_*_gpu_check.json "$OUT"/ 2>/dev/null
step threshold 60 "$PY" benchmarks/attention.py "${SWEEP[@]}" \
  --kinds dot_product,window:pallas,window:cudnn,window_topk:pallas,window_topk:xla \
  --decode-lens '' --out-dir "$OUT" --tag threshold

"$PY" - "$OUT" <<'PYEOF' 2>&1 | tee -a "$LOG" | tee "$OUT/summary.txt"
import glob, json, sys
out = sys.argv[1]
for path in sorted(glob.glob(f'{out}/attention_*.json')):
  result = json.load(open(path))
  print(f'{path}: {result["device"]}')
  for b in result['bars']:
    print(f'  bar {b["kind"]} T={b["seq_len"]}: {b["got"]:.2f}x dot_product fwd_bwd, needs '
          f'{b["needed"]}x: {"PASS" if b["passed"] else "FAIL"}')
  for r in result['rows']:
    if 'median_s' not in r:
      print(f'  {r["kind"]} T={r["seq_len"]} {r["mode"]}: {r["note"]}')
  for r in result['decode']:
    print(f'  decode {r["layout"]} context {r["context"]}: {r["median_s"] * 1e6:.0f} us')
for path in glob.glob(f'{out}/train_step_*_gpu_check.json'):
  v = json.load(open(path))['variants']
  w, d = (v[n]['median_seconds'] for n in ('bfloat16_unrolled_window',
                                          'bfloat16_unrolled_dot_product'))
  print(f'{path}: window {w * 1e3:.0f} ms, dot_product {d * 1e3:.0f} ms per step: '
        f'{d / w:.2f}x, needs 2x: {"PASS" if d / w >= 2 else "FAIL"}')
PYEOF

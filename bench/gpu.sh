#!/usr/bin/env bash
# Rows-step tokens/s and MFU on one NVIDIA GPU: Llama-3.2-1B and Llama-3-8B shapes, T=4096,
# attention xla vs cudnn vs chunked (bench/gpu_step.py), then the peer, PEFT TrainableTokens on
# transformers (bench/gpu_peft.py), on the same shapes; bench/gpu_shapes.py states the FLOP formula.
# About 4 minutes on an H200: each case is one fresh process with its own time limit, so one slow
# compile cannot eat the budget.
#
#   bash bench/gpu.sh                 # on the GPU machine (jax with CUDA; torch, transformers, peft)
#   SMOKE=1 bash bench/gpu.sh         # tiny shapes on CPU: checks the script runs end to end
#
# Output: one JSON line per case, then a markdown table, also written to bench/results/gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [[ -n "${SMOKE:-}" ]]; then
  export JAX_PLATFORMS=cpu
  CASES=("tiny 2 128") ; LIMIT=120 ; STEPS=2
else
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
  # shape batch seq: B fills the device with activations at T=4096 (remat auto decides the rest)
  CASES=("1b 8 4096" "8b 4 4096") ; LIMIT=${LIMIT:-90} ; STEPS=${STEPS:-5}
fi
mkdir -p bench/results/gpu-logs
out=bench/results/gpu.jsonl
: > "$out"
for case in "${CASES[@]}"; do
  read -r shape batch seq <<< "$case"
  for attention in xla cudnn chunked peft; do
    err=bench/results/gpu-logs/$shape-$attention.err
    if [[ $attention == peft ]]; then run=(-m bench.gpu_peft); else run=(-m bench.gpu_step --attention "$attention"); fi
    line=$(timeout "$LIMIT" "$PY" "${run[@]}" --shape "$shape" --batch "$batch" --seq "$seq" \
           --steps "$STEPS" 2>"$err" | tail -1)
    rc=$?
    if [[ -z "$line" ]]; then
      why=$(tail -1 "$err" | tr '"' "'" | cut -c1-160)
      [[ $rc -eq 124 ]] && why="over ${LIMIT}s"
      line="{\"shape\": \"$shape\", \"attention\": \"$attention\", \"B\": $batch, \"T\": $seq, \"error\": \"$why\"}"
    fi
    echo "$line" | tee -a "$out"
  done
done
"$PY" - "$out" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("\n| shape | attention | remat | layers | B x T | tokens/s | TFLOP/s | MFU | peak GiB | first step s | first loss | note |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    note = r.get("refused") or r.get("error") or r.get("device", "")
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    print(f"| {r['shape']} | {r['attention']} | {r.get('remat', '-')} | {r.get('layers', '-')} | {r['B']} x {r['T']} | "
          f"{r.get('tokens_per_s', '-')} | {r.get('tflops_per_s', '-')} | {mfu} | {r.get('peak_gib', '-')} | "
          f"{r.get('compile_s', '-')} | {r.get('loss0', '-')} | {note} |")
PYEOF

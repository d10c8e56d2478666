#!/usr/bin/env bash
# GPU readiness and speed checks in one call on a CUDA machine (about 6 minutes on one H100/H200).
#
#   OUT=gpu_out bash launch_scripts/gpu_check.sh        # results in $OUT (default gpu_check_out/)
#
# 1. smoke: a short real run through the deepspeed launcher on the visible GPUs (at most 2 ranks),
#    ZeRO-3 bf16, resumed from its checkpoint, then retrieval evaluated on the GPU (vlp bench smoke)
# 2. train: `base` (ViT-B/16 + BERT-base widths) bf16 training step, eager and torch.compile'd,
#    against HF CLIPModel, with MFU against a measured 8192^3 bf16 matmul peak (vlp bench train)
# 3. attention: our sdpa backend vs the reference at ViT sequence lengths, with torch's choice of
#    kernel and with flash attention forced (no mask: the image case) (vlp bench attention)
# Each step has its own time limit; a failed step is recorded in summary.json and the next runs.
#
# Packages: a machine without vlp's dependencies (DeepSpeed, webdataset, ...) installs them from
# wheels in .whl/ (launch_scripts/gpu_wheels.sh downloads them on a machine with an index), and
# this checkout without dependencies, into a throwaway --target.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import deepspeed, webdataset, vlp.pipeline.cli" 2>/dev/null; then
  site=$(mktemp -d)
  if ls .whl/* >/dev/null 2>&1; then
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
      --target "$site" .whl/* || echo "wheel install failed" >&2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . \
    || echo "vlp install failed" >&2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
VLP=("$PY" -m vlp.pipeline.cli)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.csv" 2>&1
declare -A status
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  status[$name]="$rc $((SECONDS - start))"
  echo "$name: exit $rc after $((SECONDS - start)) s (log $OUT/$name.log)"
}

step smoke 130 "${VLP[@]}" bench smoke --steps 40 --out "$OUT/smoke.json"
step train 210 "${VLP[@]}" bench train --config base --device cuda --batch 128 --compile blocks \
  --repeats 5 --out "$OUT/train.json"
step attention 50 "${VLP[@]}" bench attention --device cuda --dtypes bf16 --out "$OUT/attention.json"
step attention_flash 40 "${VLP[@]}" bench attention --device cuda --dtypes bf16 --masks none \
  --sdpa-kernel flash --out "$OUT/attention_flash.json"

{
  echo "{"
  first=1
  for name in smoke train attention attention_flash; do
    read -r rc secs <<< "${status[$name]:-"-1 0"}"
    [[ $first == 1 ]] || echo ","
    first=0
    printf '  "%s": {"exit_code": %s, "seconds": %s, "result": "%s"}' "$name" "$rc" "$secs" \
      "$OUT/$name.json"
  done
  echo
  echo "}"
} > "$OUT/summary.json"
cat "$OUT/summary.json"

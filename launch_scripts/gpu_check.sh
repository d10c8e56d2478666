#!/usr/bin/env bash
# GPU readiness and speed checks in one call on a CUDA machine (about 8 minutes on one H100/H200;
# the step limits below add up to 8 min 50 s).
#
#   OUT=gpu_out bash launch_scripts/gpu_check.sh        # results in $OUT (default gpu_check_out/)
#
# 1. smoke: a short real run through the deepspeed launcher on the visible GPUs (at most 2 ranks),
#    ZeRO-3 bf16 (ds_configs/zero3_bf16.json), resumed from its checkpoint, then retrieval
#    evaluated on the GPU (vlp bench smoke); smoke_zero2: the same with zero2_bf16.json
# 2. train: `base` (ViT-B/16 + BERT-base widths) bf16 training step, eager and torch.compile'd,
#    against HF CLIPModel, with MFU against a measured 8192^3 bf16 matmul peak (vlp bench train)
# 3. attention: our sdpa backend vs the reference at ViT sequence lengths, with torch's choice of
#    kernel and with flash attention forced (no mask: the image case) (vlp bench attention)
# 4. hooks: the host time of ZeRO-3's per-module hooks on this GPU host, for `base` at batch 64
#    under zero3_bf16.json, and its forward+backward with ZeRO-3 against plain torch on one GPU
#    (vlp bench comms with no two-node runs), the term docs/scaling.md can only bound from a CPU
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

step smoke 90 "${VLP[@]}" bench smoke --steps 20 --ds-config zero3_bf16.json \
  --out "$OUT/smoke.json"
step smoke_zero2 80 "${VLP[@]}" bench smoke --steps 20 --ds-config zero2_bf16.json \
  --out "$OUT/smoke_zero2.json"
step train 180 "${VLP[@]}" bench train --config base --device cuda --batch 128 --compile blocks \
  --repeats 5 --out "$OUT/train.json"
step attention 50 "${VLP[@]}" bench attention --device cuda --dtypes bf16 --out "$OUT/attention.json"
step attention_flash 40 "${VLP[@]}" bench attention --device cuda --dtypes bf16 --masks none \
  --sdpa-kernel flash --out "$OUT/attention_flash.json"
step hooks 90 "${VLP[@]}" bench comms --config base --image-size 224 --ds-configs "" --batch 64 \
  --hook-steps 5 --data-dir "${TMPDIR:-/tmp}/vlp_gpu_check_hooks_data" --out "$OUT/hooks.json"

{
  echo "{"
  first=1
  for name in smoke smoke_zero2 train attention attention_flash hooks; do
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

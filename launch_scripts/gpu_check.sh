#!/usr/bin/env bash
# GPU readiness and speed checks in one call of at most 10 minutes on a CUDA machine, installs
# included: the step limits below add up to 460 s, installs take about a minute.
#
#   OUT=gpu_out bash launch_scripts/gpu_check.sh        # results in $OUT (default gpu_check_out/)
#
# Most valuable first, so a machine lost half-way still answers the first questions:
# 1. smoke_zero2, smoke: a short real run through the deepspeed launcher on one GPU with
#    ds_configs/zero2_bf16.json, then zero3_bf16.json, resumed from its checkpoint, then
#    retrieval evaluated on the GPU (vlp bench smoke)
# 2. train: `base` (ViT-B/16 + BERT-base widths) bf16 training step, eager, against HF
#    CLIPModel, with MFU as training computes it (vlp bench train)
# 3. hooks: the host time of ZeRO-3's per-module hooks on this GPU host, for `base` at batch 64
#    under zero3_bf16.json, and its forward+backward with ZeRO-3 against plain torch on one GPU
#    (vlp bench comms with no two-node runs), the term docs/scaling.md can only bound from a CPU
# 4. attention, attention_flash: our sdpa backend vs the reference at ViT sequence lengths, with
#    torch's choice of kernel, then with flash attention forced (vlp bench attention)
#
# Every figure is appended to $OUT/results.jsonl the moment it is measured (one JSON line each,
# VLP_FIGURES), as is each step's exit code and time: a step cut off by its limit keeps what it
# had. Each step's own JSON ($OUT/NAME.json) is written only when the step completes.
#
# Packages: a machine without DeepSpeed or webdataset installs them from wheels in .whl/
# (launch_scripts/gpu_wheels.sh makes them where pip reaches an index; .whl/ is git-ignored, so a
# copy of the working tree must carry `.whl` explicitly), keeping the image's CUDA torch; this
# checkout is installed without dependencies into a throwaway --target.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false VLP_FIGURES="$OUT/results.jsonl"

if ! "$PY" -c "import deepspeed, webdataset" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    # resolves against the installed packages: only what the image lacks comes from .whl/
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --no-index --find-links .whl \
      deepspeed webdataset || echo "wheel install failed" >&2
  else
    echo "no wheels in .whl/ (launch_scripts/gpu_wheels.sh) and no deepspeed here" >&2
  fi
fi
if ! "$PY" -c "import vlp.pipeline.cli" 2>/dev/null; then
  site=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" . \
    || echo "vlp install failed" >&2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH"
fi
VLP=("$PY" -m vlp.pipeline.cli)

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv \
  > "$OUT/nvidia_smi.csv" 2>&1
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '{"step": "%s", "exit_code": %s, "seconds": %s, "limit_s": %s, "result": "%s"}\n' \
    "$name" "$rc" "$((SECONDS - start))" "$limit" "$OUT/$name.json" >> "$VLP_FIGURES"
  echo "$name: exit $rc after $((SECONDS - start)) s (log $OUT/$name.log)"
}

step smoke_zero2 75 "${VLP[@]}" bench smoke --ranks 1 --steps 20 --ds-config zero2_bf16.json \
  --out "$OUT/smoke_zero2.json"
step smoke 75 "${VLP[@]}" bench smoke --ranks 1 --steps 20 --ds-config zero3_bf16.json \
  --out "$OUT/smoke.json"
step train 120 "${VLP[@]}" bench train --config base --device cuda --batch 128 --dtype bf16 \
  --compile none --repeats 5 --out "$OUT/train.json"
step hooks 90 "${VLP[@]}" bench comms --config base --image-size 224 --ds-configs "" --batch 64 \
  --hook-steps 5 --data-dir "${TMPDIR:-/tmp}/vlp_gpu_check_hooks_data" --out "$OUT/hooks.json"
step attention 60 "${VLP[@]}" bench attention --device cuda --dtypes bf16 --repeats 10 \
  --out "$OUT/attention.json"
step attention_flash 40 "${VLP[@]}" bench attention --device cuda --dtypes bf16 --masks none \
  --sdpa-kernel flash --repeats 10 --out "$OUT/attention_flash.json"
cat "$VLP_FIGURES"

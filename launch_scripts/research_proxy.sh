#!/usr/bin/env bash
# The research loop's proxy: the quickstart recipe cut to PROXY_STEPS (default 540, half its
# pairs) on the data a quickstart already made, then retrieval (ITM re-rank of the top 16) and
# the edited-caption evaluation. About 6 minutes on a 2-core machine with native bf16. Compare
# recipes side by side on the same data and seed, and confirm a winner with the full quickstart
# (docs/fusion.md says where the proxy's ranking agrees with it and where it is blind).
#
#   bash launch_scripts/research_proxy.sh NAME [training overrides...]
#   bash launch_scripts/research_proxy.sh sincos 'model.overrides={position_embedding: sincos}'
#
# QUICKSTART_OUT (default quickstart_out) holds the data; runs go to $QUICKSTART_OUT/proxy/NAME,
# and one line of results to $QUICKSTART_OUT/proxy/results.jsonl.
set -euo pipefail
name=${1:?usage: research_proxy.sh NAME [training overrides...]}
shift
out=${QUICKSTART_OUT:-quickstart_out}
steps=${PROXY_STEPS:-540}
data=$out/data
world=$data/world
run=$out/proxy/$name
[ -f "$world/world.json" ] || { echo "no quickstart data in $data: run vlp quickstart first" >&2; exit 2; }
shards=$(python3 -c "import sys; from vlp.pipeline.data.manifest import shard_url_pattern
print(shard_url_pattern(sys.argv[1]))" "$data/shards")
# The recipe's warmup, cut to the run (a warmup longer than the run is refused).
warmup=$(python3 -c "import sys; from vlp.pipeline.train.config import load_train_config
print(min(int(sys.argv[1]), load_train_config('tiny_synth.yaml').optim.warmup_steps))" "$steps")
vlp train --recipe tiny_synth.yaml --set "run_dir=$run" "data.shards=$shards" \
    "data.tokenizer=$data/tokenizer" "data.lexicon=$world/lexicon.json" \
    "optim.max_steps=$steps" "optim.warmup_steps=$warmup" "checkpoint.every_steps=$steps" \
    checkpoint.overwrite=true "$@"
vlp eval retrieval --checkpoint "$run/checkpoints" --image-root "$world/retrieval" \
    --karpathy-json "$world/retrieval/dataset_synth.json" --rerank-k 16 --bf16 \
    --out "$run/retrieval.json" > /dev/null
vlp eval compositionality --checkpoint "$run/checkpoints" --edits "$world/compositionality" \
    --image-root "$world" --bf16 --out "$run/compositionality.json" > /dev/null
python3 - "$name" "$run" "$out/proxy/results.jsonl" "$@" <<'PY'
import json, sys
name, run, results, *overrides = sys.argv[1:]
recall = json.load(open(f"{run}/retrieval.json"))["metrics"]
edits = json.load(open(f"{run}/compositionality.json"))["metrics"]
row = {"name": name, "overrides": overrides,
       "t2i_r1": recall["image_retrieval_recall@1"],
       "t2i_r1_reranked": recall["reranked_image_retrieval_recall@1"], **edits}
with open(results, "a") as f:
    f.write(json.dumps(row) + "\n")
print(" ".join(f"{k}={100 * v:.1f}" for k, v in row.items() if isinstance(v, float)))
PY

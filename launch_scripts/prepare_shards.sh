#!/usr/bin/env bash
# Shard-preparation job: URL list -> img2dataset shards -> manifest -> tokenizer.
#   URL_LIST=urls.parquet OUT=/data/shards bash launch_scripts/prepare_shards.sh
# Optional: IMAGE_SIZE (256), PROCESSES (nproc), THREADS (32), SAMPLES_PER_SHARD (10000),
# VOCAB_SIZE (30522), DISTRIBUTOR (multiprocessing | pyspark).
set -euo pipefail
: "${URL_LIST:?set URL_LIST to a parquet/csv/tsv file with url and caption columns}"
: "${OUT:?set OUT to the output folder}"
vlp data download --url-list "$URL_LIST" --out "$OUT/shards" \
  --image-size "${IMAGE_SIZE:-256}" --processes "${PROCESSES:-$(nproc)}" \
  --threads "${THREADS:-32}" --samples-per-shard "${SAMPLES_PER_SHARD:-10000}" \
  --distributor "${DISTRIBUTOR:-multiprocessing}"
vlp data tokenizer --shard-dir "$OUT/shards" --out "$OUT/tokenizer" \
  --vocab-size "${VOCAB_SIZE:-30522}"

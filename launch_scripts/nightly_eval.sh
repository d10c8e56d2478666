#!/usr/bin/env bash
# Nightly evaluation of every new checkpoint under a runs folder (vlp eval nightly), cron-ready.
#
# Usage: launch_scripts/nightly_eval.sh --runs RUNS [--suite SUITE.yaml] [--out OUTDIR] [...]
#   Arguments go to `vlp eval nightly`. A lock (flock) on OUTDIR/nightly.lock, or $VLP_NIGHTLY_LOCK,
#   makes a second start exit at once (status 75) while one is still running, so a slow night
#   never overlaps the next. Results: OUTDIR/results.parquet, report.html, tensorboard/.
#
# crontab line (every night at 02:30; cron has a minimal PATH, so name the python; one line):
#   30 2 * * * PYTHON=/opt/venv/bin/python /path/to/vlp/launch_scripts/nightly_eval.sh
#              --runs /data/runs --suite /data/runs/eval_suite.yaml --out /data/runs/nightly
#              >> /data/runs/nightly/cron.log 2>&1
set -euo pipefail
PY=${PYTHON:-python3}

# The lock lives in the output folder: --out if given, else RUNS/nightly (the command's default).
runs="" out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --runs) runs=${args[i + 1]:-} ;;
    --runs=*) runs=${args[i]#--runs=} ;;
    --out) out=${args[i + 1]:-} ;;
    --out=*) out=${args[i]#--out=} ;;
  esac
done
if [[ -z "$runs" ]]; then
  echo "usage: $0 --runs RUNS [--suite SUITE] [--out OUTDIR]" >&2
  exit 2
fi
out=${out:-$runs/nightly}
lock=${VLP_NIGHTLY_LOCK:-$out/nightly.lock}
mkdir -p "$(dirname "$lock")"

exec 9>>"$lock"
if ! flock --nonblock 9; then
  echo "$(date -u '+%F %T') nightly eval already running (lock $lock held); not starting" >&2
  exit 75
fi
echo "$(date -u '+%F %T') nightly eval starting: $*"
"$PY" -m vlp.pipeline.cli eval nightly "$@"

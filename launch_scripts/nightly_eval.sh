#!/usr/bin/env bash
# Nightly evaluation of every new checkpoint under a runs folder (vlp eval nightly), cron-ready.
#
# Usage: launch_scripts/nightly_eval.sh --runs RUNS [--suite SUITE.yaml] [--out OUTDIR] [...]
#   Arguments go to `vlp eval nightly`, which holds a lock on OUTDIR/nightly.lock for the whole
#   run: a second start on the same OUTDIR exits at once (status 2, "another nightly run holds
#   ..."), so a slow night never overlaps the next. Results: OUTDIR/results.parquet, report.html,
#   tensorboard/.
#
# crontab line (every night at 02:30; cron has a minimal PATH, so name the python):
# 30 2 * * * PYTHON=/opt/venv/bin/python /path/to/nightly_eval.sh --runs /data/runs --suite /data/runs/eval_suite.yaml --out /data/runs/nightly >> /data/runs/nightly/cron.log 2>&1
set -euo pipefail
echo "$(date -u '+%F %T') nightly eval: $*"
exec "${PYTHON:-python3}" -m vlp.pipeline.cli eval nightly "$@"

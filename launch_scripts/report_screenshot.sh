#!/usr/bin/env bash
# Look at the nightly report as someone it was mailed to sees it: install Chromium from Debian's
# packages when missing (needs root), copy REPORT_HTML alone into an empty folder (a link to any
# other file shows up broken), and render it headless into a PNG of WIDTHxHEIGHT pixels.
#   bash launch_scripts/report_screenshot.sh runs/nightly/report.html report.png
# Not needed by the test suite (its Chromium checks are skipped without a browser).
set -euo pipefail
REPORT=${1:?usage: report_screenshot.sh REPORT_HTML OUT_PNG [WIDTHxHEIGHT]}
OUT=${2:?usage: report_screenshot.sh REPORT_HTML OUT_PNG [WIDTHxHEIGHT]}
SIZE=${3:-1400x2600}
if ! command -v chromium >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
fi
ALONE=$(mktemp -d)
trap 'rm -rf "$ALONE"' EXIT
cp "$REPORT" "$ALONE/report.html"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --window-size="${SIZE/x/,}" --screenshot="$(realpath "$OUT")" \
    "file://$ALONE/report.html"

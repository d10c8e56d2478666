#!/usr/bin/env bash
# Install (idempotent), check the import layers, and run the whole test suite. This is the
# README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch_scripts/install_cpu.sh
bash launch_scripts/lint_imports.sh
exec python3 -m pytest -q -x --durations=15 "$@"

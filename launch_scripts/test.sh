#!/usr/bin/env bash
# Install (idempotent), check the import layers, and run the whole test suite. This is the
# README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch_scripts/install_cpu.sh
bash launch_scripts/lint_imports.sh
# Bytecode caches are written (where the environment turns them off, each of the suite's
# several hundred Python processes would compile the package, and pytest rewrite every test
# file, again).
unset PYTHONDONTWRITEBYTECODE
# Two xdist workers, each test file on one of them (so module fixtures are built once), and one
# thread per process: two workers and the jobs they start already fill two cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python3 -m pytest -q -x -n 2 --dist loadfile -p no:benchmark --durations=15 "$@"

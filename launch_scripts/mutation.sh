#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (docs/testing.md).
#   bash launch_scripts/mutation.sh run [MODULE ...] [--survivors]   mutate (default: every core module)
#   bash launch_scripts/mutation.sh collect DIR MODULE ...  results of a parallel run (MUTATION_WORKSPACE=DIR)
#   bash launch_scripts/mutation.sh record             update survivors.toml and docs/testing.md
#   bash launch_scripts/mutation.sh show [MODULE ...]  unrecorded survivors with their diffs
#   bash launch_scripts/mutation.sh sample             CI's sample: 15 mutants of 3 modules
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import mutmut" 2>/dev/null || bash launch_scripts/install_cpu.sh
exec python3 tests/mutation/mutate.py "$@"

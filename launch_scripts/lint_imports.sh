#!/usr/bin/env bash
# Check that the layers point one way (.importlinter). import-linter reads the code from disk, and
# an editable install maps `vlp` with an import hook it cannot walk, so this builds a throwaway
# tree of links, vlp/{models,pipeline,data_prep,ds_configs,launch_scripts} -> the checkout, and
# checks that.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/vlp"
for folder in models pipeline data_prep ds_configs launch_scripts; do
  cp -rs "$PWD/$folder" "$tree/vlp/$folder"
done
PYTHONPATH="$tree" lint-imports .importlinter

#!/usr/bin/env bash
# Set up and run the whole test suite (real models are fetched once into ~/.cache/jang).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
set -euo pipefail
python -m pytest -q "$@"

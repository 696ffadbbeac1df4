#!/usr/bin/env bash
# Sums the "test result:" lines of a cargo test log into one closing line.
set -euo pipefail
log=${1:?log file}
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f; exit (f > 0 || p == 0) }' "$log"

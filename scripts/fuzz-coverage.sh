#!/usr/bin/env bash
# What the fuzz corpora reach: for each TARGET (default: every target), `cargo fuzz
# coverage` replays fuzz/corpus/TARGET through a coverage build, and llvm-cov prints the
# region and line coverage of each product file the target reaches (crates/, not the
# harness or the dependencies; files it never enters are left out). Needs the llvm-tools rustup component (installed
# here when missing) and a corpus (run scripts/fuzz.sh first).
#
#   scripts/fuzz-coverage.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
tools=$sysroot/lib/rustlib/$host/bin
if [[ ! -x $tools/llvm-cov ]]; then
  rustup component add llvm-tools >/dev/null
fi
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list)
fi
for target in "${targets[@]}"; do
  [[ -d fuzz/corpus/$target ]] || { echo "fuzz-coverage: no corpus for $target" >&2; exit 1; }
  cargo fuzz coverage -s none "$target" >/dev/null 2>&1 || {
    echo "fuzz-coverage: cargo fuzz coverage $target failed" >&2
    exit 1
  }
  bin=$(find target fuzz/target -path "*/coverage/*/release/$target" -type f | head -n 1)
  [[ -n $bin ]] || { echo "fuzz-coverage: no coverage build of $target found" >&2; exit 1; }
  echo "== $target ($(find "fuzz/corpus/$target" -type f | wc -l) corpus inputs)"
  "$tools/llvm-cov" report "$bin" -instr-profile="fuzz/coverage/$target/coverage.profdata" \
    -ignore-filename-regex='(/\.cargo/|/rustc/|/fuzz/|/library/)' |
    awk 'NR == 1 {print "file", "regions", "lines"} $1 != "Filename" && $1 != "TOTAL" && NF >= 13 && $4 != "0.00%" {print $1, $4, $10}' | column -t
done

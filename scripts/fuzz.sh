#!/usr/bin/env bash
# Runs every fuzz target in turn (one at a time: each uses one core) for SECONDS each
# (default $FUZZ_SECS, else 60), from seed corpora of real inputs (scripts/fuzz-seeds.py),
# and prints a line per target: executions, time, coverage. Fails on the first crash,
# hang (-timeout) or allocation over -malloc_limit_mb; the input that did it is left in
# fuzz/artifacts/TARGET/. `make fuzz FUZZ_SECS=N` and scripts/fuzz-smoke.sh (CI) run it.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# FUZZ_SANITIZER (default none) is cargo fuzz's --sanitizer: the code under test is safe
# Rust, whose bounds and overflow checks (debug assertions are on) panic by themselves, and
# without ASan the targets run 3 to 8 times faster; `address` adds ASan (for the C
# decoders underneath). Every target aborts on a single allocation over 256 MiB either
# way (fuzz/src/lib.rs). FUZZ_LOG_DIR keeps each target's libFuzzer log (default: a
# temporary directory). Fuzzing needs nightly flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them.
#
# FUZZ_RUNS=N runs every target for N executions instead (no time limit; SECONDS is then
# ignored): `make fuzz FUZZ_RUNS=10000000` is the run docs/FUZZING.md records.
# FUZZ_SKIP_BUILD=1 skips the seeds and the build (a second runner beside a first one).
# FUZZ_TMPDIR (default /dev/shm) holds what the targets write (a private directory).
# FUZZ_TIMEOUT (10 s) is how long one input may take before it counts as a hang: raise it
# when the runners share the machine with other work (libFuzzer measures wall time).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-${FUZZ_SECS:-60}}
sanitizer=${FUZZ_SANITIZER:-none}
shift $(($# > 0 ? 1 : 0))
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
bin=${CKSTREAM_BIN:-target/release/ckstream}
[[ -x $bin ]] || cargo build --release --locked --quiet
targets=("$@")
if ((${#targets[@]} == 0)); then
  mapfile -t targets < <(cargo fuzz list)
fi
# The unpack and podman_import targets write files on every run: keep them in memory.
work=$(mktemp -d -p "${FUZZ_TMPDIR:-$([[ -d /dev/shm ]] && echo /dev/shm || echo "${TMPDIR:-/tmp}")}")
trap 'rm -rf "$work"' EXIT
logs=${FUZZ_LOG_DIR:-$work}
mkdir -p "$logs"
if [[ -z ${FUZZ_SKIP_BUILD:-} ]]; then
  scripts/fuzz-seeds.py "$bin" >/dev/null
  if ! cargo fuzz build -s "$sanitizer" >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    exit 1
  fi
fi
limit=(-max_total_time="$seconds")
[[ -n ${FUZZ_RUNS:-} ]] && limit=(-runs="$FUZZ_RUNS")
for target in "${targets[@]}"; do
  max_len=65536
  [[ $target == boltdb ]] && max_len=262144
  log=$logs/$target.log
  # The unpack and podman_import targets write below TMPDIR: a private one, removed after.
  mkdir -p "$work/tmp-$target"
  if ! TMPDIR=$work/tmp-$target cargo fuzz run -s "$sanitizer" "$target" -- \
    "${limit[@]}" -max_len="$max_len" -timeout="${FUZZ_TIMEOUT:-10}" \
    -rss_limit_mb=2048 -malloc_limit_mb=256 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz: $target failed (its input is in fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  rm -rf "$work/tmp-$target"
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log")
  cov=$(grep -E '^#[0-9]+' "$log" | tail -n 1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' || true)
  printf 'fuzz: %-15s %10s runs in %5ss  %s\n' "$target" "$runs" "$secs" "$cov"
done
echo "fuzz: no crashes"

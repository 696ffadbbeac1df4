#!/usr/bin/env bash
# Builds the fuzz targets and runs each briefly (FUZZ_SECONDS, default 30) from a seed
# corpus of real archives. Installs cargo-fuzz if it is missing. Fuzzing needs
# nightly flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-30}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
bin=${CKSTREAM_BIN:-target/release/ckstream}
[[ -x $bin ]] || cargo build --release --locked --quiet
seed_src=$(mktemp -d)
trap 'rm -rf "$seed_src"' EXIT
mkdir -p "$seed_src/tree/d" fuzz/corpus/reader fuzz/corpus/scanner
printf 'hello\n' > "$seed_src/tree/d/small"
seq 1 3000 > "$seed_src/tree/text"
ln -sf d/small "$seed_src/tree/link"
head -c 70000 /dev/urandom > "$seed_src/tree/random"
for codec in none lz4 zstd; do
  "$bin" pack -q -c "$codec" --chunk-kib 64 -o "$seed_src/seed-$codec.cka" "$seed_src/tree"
  cp "$seed_src/seed-$codec.cka" fuzz/corpus/reader/
  cp "$seed_src/seed-$codec.cka" fuzz/corpus/scanner/
done
export RUSTC_BOOTSTRAP=1
for target in reader scanner; do
  echo "fuzz-smoke: $target for ${seconds}s"
  log=$seed_src/fuzz-$target.log
  if ! cargo fuzz run "$target" -- -max_total_time="$seconds" -max_len=262144 -rss_limit_mb=2048 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "fuzz-smoke: $target found a crash (artifacts in fuzz/artifacts/$target)" >&2
    exit 1
  fi
  grep -E '^(#[0-9]+\s+DONE|Done [0-9]+ runs)' "$log" | tail -n 1
done
echo "fuzz-smoke: no crashes"

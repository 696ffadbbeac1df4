#!/usr/bin/env bash
# `make demo`: packs a sample (a real CRIU image directory of a live process plus a
# tree of documentation files), lists, reads one file at random, verifies, unpacks and
# compares — printing each step. Everything happens under a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CKSTREAM_BIN:-$PWD/target/release/ckstream}
work=$(mktemp -d /var/tmp/ckstream-demo.XXXXXX)
memtest_pid=
cleanup() {
  [[ -n $memtest_pid ]] && kill -TERM "$memtest_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Building a sample under $work"
mkdir -p "$work/sample"
cp -a /usr/share/doc "$work/sample/doc" 2>/dev/null || true
if command -v criu >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
  gcc -O2 -o "$work/memtest" tests/progs/memtest.c
  setsid "$work/memtest" 64 "$work/hb" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 100); do [[ -s $work/hb ]] && break; sleep 0.1; done
  memtest_pid=$(cat "$work/hb.pid")
  mkdir -p "$work/sample/criu-images"
  if criu dump -t "$memtest_pid" -D "$work/sample/criu-images" --leave-running -o dump.log >/dev/null 2>&1; then
    echo "CRIU images of a live 64 MiB process (pid $memtest_pid): $(du -sh "$work/sample/criu-images" | cut -f1)"
  else
    echo "criu dump failed (see $work/sample/criu-images/dump.log); continuing without it"
  fi
fi
echo "sample: $(du -sh "$work/sample" | cut -f1) in $(find "$work/sample" | wc -l) paths"

step "ckstream pack (zstd level 1, all cores)"
"$bin" pack -o "$work/sample.cka" "$work/sample"
step "ckstream info"
"$bin" info "$work/sample.cka"
step "ckstream ls -l (first lines)"
"$bin" ls -l "$work/sample.cka" | head -n 8
step "ckstream cat: one file by random access"
one=$("$bin" ls "$work/sample.cka" | grep -m1 -E '\.img$|copyright$' || true)
if [[ -n $one ]]; then
  echo "$one: $("$bin" cat "$work/sample.cka" "$one" | wc -c) bytes, sha256 matches the original: $(
    [[ $("$bin" cat "$work/sample.cka" "$one" | sha256sum) == $(sha256sum <"$work/${one}") ]] && echo yes || echo NO)"
fi
step "ckstream verify"
"$bin" verify "$work/sample.cka"
step "ckstream unpack and compare with the original"
"$bin" unpack "$work/sample.cka" -C "$work/restored"
diff -r --no-dereference "$work/sample" "$work/restored/sample" && echo "restored tree is identical"
step "Peer for comparison: tar | zstd -1 -T0"
start=$(date +%s.%N)
tar -C "$work" -cf - sample | zstd -1 -T0 -q -o "$work/sample.tar.zst"
end=$(date +%s.%N)
printf 'tar|zstd: %s in %.2fs; ckstream: %s\n' "$(du -h "$work/sample.tar.zst" | cut -f1)" "$(echo "$end - $start" | bc)" "$(du -h "$work/sample.cka" | cut -f1)"
step "A damaged archive is refused"
cp "$work/sample.cka" "$work/damaged.cka"
printf '\xff' | dd of="$work/damaged.cka" bs=1 seek=$(( $(stat -c %s "$work/damaged.cka") / 2 )) conv=notrunc 2>/dev/null
if "$bin" verify "$work/damaged.cka"; then echo "UNEXPECTED: damage not detected"; exit 1; else echo "(exit code $? as expected)"; fi
echo
echo "demo finished: pack, ls, cat, verify, unpack all worked."

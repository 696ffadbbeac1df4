#!/usr/bin/env bash
# `make demo`: checkpoints a live process tree with `ckstream dump` and restores it with
# `ckstream restore` (checking its memory), then packs a sample tree, lists it, reads one
# file at random, verifies, unpacks and compares, then does the same against a local S3
# server (scripts/s3-server.sh) — printing each step. Everything happens under a
# temporary directory that is removed at the end. Any step that fails (a command, or a
# check of what it did) stops the demo with a non-zero exit and says which one.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CKSTREAM_BIN:-$PWD/target/release/ckstream}
work=$(mktemp -d /var/tmp/ckstream-demo.XXXXXX)
memtest_pid=
cleanup() {
  [[ -n $memtest_pid ]] && pkill -KILL -s "$memtest_pid" 2>/dev/null || true
  [[ -f $work/s3/pid ]] && CKSTREAM_S3_DIR=$work/s3 scripts/s3-server.sh stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; current_step=$*; }
current_step="setting up"
fail() { printf '\ndemo: FAILED at "%s": %s\n' "$current_step" "$*" >&2; exit 1; }
# A failing command anywhere (set -e) also ends the demo with its step named.
trap 'printf "\ndemo: FAILED at \"%s\": command exited %s: %s\n" "$current_step" "$?" "$BASH_COMMAND" >&2' ERR

if command -v /usr/local/sbin/criu >/dev/null 2>&1 || command -v criu >/dev/null 2>&1; then
  step "Checkpointing a live process with ckstream dump (CRIU --stream, straight into an archive)"
  gcc -O2 -o "$work/memtest" tests/progs/memtest.c
  MEMTEST_FILL=mixed setsid -f "$work/memtest" 256 "$work/hb" 1 </dev/null >/dev/null 2>&1
  for _ in $(seq 200); do [[ -s $work/hb ]] && break; sleep 0.05; done
  [[ -s $work/hb.pid ]] || fail "the memtest process did not start"
  memtest_pid=$(cat "$work/hb.pid")
  echo "started a process tree (pid $memtest_pid + 1 child) holding 256 MiB of checksummed memory"
  "$bin" dump --pid "$memtest_pid" -o "$work/process.cka" -c zstd
  for _ in $(seq 200); do pgrep -s "$memtest_pid" >/dev/null || break; sleep 0.05; done
  if pgrep -s "$memtest_pid" >/dev/null; then
    fail "the process still runs after the dump"
  fi
  echo "the process is gone (CRIU killed it after the archive data was durable)"
  "$bin" info "$work/process.cka" | sed -n '1,8p'
  step "Restoring it with ckstream restore (images streamed to CRIU, verified on the way)"
  before=$(cat "$work/hb")
  "$bin" restore "$work/process.cka"
  sleep 1
  after=$(cat "$work/hb")
  echo "heartbeat: $before -> $after"
  [[ $after != "$before" ]] || fail "the restored process does not run (no heartbeat)"
  kill -USR1 "$memtest_pid"
  for _ in $(seq 100); do [[ -s $work/hb.verify ]] && break; sleep 0.05; done
  [[ -s $work/hb.verify ]] || fail "the restored process did not check its memory"
  echo "memory check after restore: $(head -n1 "$work/hb.verify") ($(grep children_ok "$work/hb.verify"))"
  [[ $(head -n1 "$work/hb.verify") == verify=ok ]] || fail "the restored memory is not what was dumped"
fi

step "Building a sample tree under $work"
mkdir -p "$work/sample"
cp -a /usr/share/doc "$work/sample/doc" 2>/dev/null || true
echo "sample: $(du -sh "$work/sample" | cut -f1) in $(find "$work/sample" | wc -l) paths"

step "ckstream pack (zstd level 1, all cores)"
"$bin" pack -o "$work/sample.cka" "$work/sample"
step "ckstream info"
"$bin" info "$work/sample.cka"
step "ckstream ls -l (first lines)"
"$bin" ls -l "$work/sample.cka" | head -n 8
step "ckstream cat: one file by random access"
one=$("$bin" ls "$work/sample.cka" | grep -m1 -E 'copyright$' || true)
if [[ -n $one ]]; then
  "$bin" cat "$work/sample.cka" "$one" >"$work/one.out"
  echo "$one: $(wc -c <"$work/one.out") bytes, sha256 matches the original: yes"
  cmp -s "$work/one.out" "$work/${one}" || fail "cat of $one does not match the original"
fi
step "ckstream verify"
"$bin" verify "$work/sample.cka"
step "ckstream unpack and compare with the original"
"$bin" unpack "$work/sample.cka" -C "$work/restored"
diff -r --no-dereference "$work/sample" "$work/restored/sample" || fail "the unpacked tree differs"
echo "restored tree is identical"
step "Peer for comparison: tar | zstd -1 -T0"
start=$(date +%s.%N)
tar -C "$work" -cf - sample | zstd -1 -T0 -q -o "$work/sample.tar.zst"
end=$(date +%s.%N)
printf 'tar|zstd: %s in %ss; ckstream: %s\n' "$(du -h "$work/sample.tar.zst" | cut -f1)" "$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')" "$(du -h "$work/sample.cka" | cut -f1)"
step "A damaged archive is refused"
cp "$work/sample.cka" "$work/damaged.cka"
printf '\xff' | dd of="$work/damaged.cka" bs=1 seek=$(( $(stat -c %s "$work/damaged.cka") / 2 )) conv=notrunc 2>/dev/null
code=0
"$bin" verify "$work/damaged.cka" || code=$?
[[ $code == 3 ]] || fail "verify of a damaged archive exited $code, not 3"
echo "(exit code $code as expected)"
step "Signed and encrypted: only the recipient's key opens it, only the signer's is trusted"
"$bin" key generate -o "$work/signer"
"$bin" key generate -o "$work/recipient"
"$bin" pack -q -o "$work/sealed.cka" --sign "$work/signer" --encrypt-to "$work/recipient.pub" "$work/sample"
code=0
"$bin" ls "$work/sealed.cka" >/dev/null 2>&1 || code=$?
[[ $code != 0 ]] || fail "ls of an encrypted archive without the key succeeded"
echo "without the key: refused (exit code $code)"
"$bin" --key "$work/recipient" --trusted-key "$work/signer.pub" info "$work/sealed.cka" | grep -E '^(encryption|signature):'
"$bin" --key "$work/recipient" --trusted-key "$work/signer.pub" verify "$work/sealed.cka"
step "Object storage: the same archive in a local S3 server (SeaweedFS on 127.0.0.1)"
if s3env=$(CKSTREAM_S3_DIR=$work/s3 CKSTREAM_S3_PORT=${CKSTREAM_S3_PORT:-18533} scripts/s3-server.sh start); then
  eval "$s3env"
  url="s3://$CKSTREAM_S3_BUCKET/demo/sample.cka"
  "$bin" pack -o "$url" --shards 4 "$work/sample"
  CKSTREAM_S3_STATS=1 "$bin" ls "$url" >"$work/s3.ls" 2>"$work/s3.err"
  "$bin" ls "$work/sample.cka" | cmp -s - "$work/s3.ls" || fail "ls of $url differs from the local archive's"
  echo "ls of $url: $(wc -l <"$work/s3.ls") entries, $(sed -n 's/^ckstream-s3-stats: //p' "$work/s3.err")"
  if [[ -n $one ]]; then
    CKSTREAM_S3_STATS=1 "$bin" cat "$url" "$one" >"$work/one.s3" 2>"$work/s3.err"
    cmp -s "$work/one.s3" "$work/${one}" || fail "cat of $one from S3 does not match the original"
    echo "cat of $one: sha256 matches the original: yes; $(sed -n 's/^ckstream-s3-stats: //p' "$work/s3.err")"
  fi
  "$bin" verify "$url"
  CKSTREAM_S3_DIR=$work/s3 scripts/s3-server.sh stop
else
  echo "(no local S3 server: scripts/s3-server.sh install needs PyPI; skipped)"
fi
trap - ERR
echo
echo "demo finished: dump, restore, pack, ls, cat, verify, unpack (also from S3), signed and encrypted archives all worked."

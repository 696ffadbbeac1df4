#!/usr/bin/env bash
# criu-image-streamer's README pipelines, run with ckstream installed under the name
# criu-image-streamer. Needs root, criu, a memtest binary ($MEMTEST) and ckstream ($CKSTREAM).
# Exits non-zero with a message on the first failure.
set -euo pipefail
: "${CKSTREAM:?}" "${MEMTEST:?}"
work=$(mktemp -d /tmp/ckstream-compat.XXXXXX)
pid=
cleanup() {
  if [[ -n $pid ]]; then pkill -KILL -s "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() { # message; CRIU's own logs say why a criu step failed
  echo "FAIL: $*" >&2
  for log in "$work/images/dump.log" "$work/images/restore.log"; do
    [[ -f $log ]] && { echo "--- last lines of $log:"; grep -E "Error|Warn" "$log" | tail -n 8; } >&2
  done
  exit 1
}
mkdir -p "$work/bin" "$work/images" "$work/scratch/app"
ln -s "$CKSTREAM" "$work/bin/criu-image-streamer"
export PATH="$work/bin:$PATH"
criu=${CRIU:-criu}

criu-image-streamer --version >/dev/null || fail "--version"

start_app() {
  # The previous app's files would pass for the new one's (its pid is gone by now).
  rm -f "$work/hb" "$work/hb.pid"
  setsid -f "$MEMTEST" 32 "$work/hb" 1 </dev/null >/dev/null 2>&1
  for _ in $(seq 400); do [[ -s $work/hb && -s $work/hb.pid ]] && break; sleep 0.05; done
  [[ -s $work/hb && -s $work/hb.pid ]] || fail "the test app did not start"
  pid=$(cat "$work/hb.pid")
}
wait_gone() { for _ in $(seq 200); do pgrep -s "$pid" >/dev/null || return 0; sleep 0.05; done; fail "tree did not exit"; }
wait_line() { # file line
  for _ in $(seq 400); do grep -qx "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
  fail "no '$2' in $1: $(cat "$1" 2>/dev/null)"
}
check_alive_and_intact() { # what
  local c; c=$(cat "$work/hb")
  for _ in $(seq 200); do (( $(cat "$work/hb") > c + 1 )) && break; sleep 0.05; done
  (( $(cat "$work/hb") > c + 1 )) || fail "$1: heartbeat stopped"
  rm -f "$work/hb.verify"; kill -USR1 "$pid"
  for _ in $(seq 200); do [[ -s $work/hb.verify ]] && break; sleep 0.05; done
  [[ $(head -n1 "$work/hb.verify") == verify=ok ]] || fail "$1: memory check: $(cat "$work/hb.verify")"
}

# Example 1 (without lz4): capture into a pipe, restore from a pipe; plus an external
# file (example 4) woven in from tar and extracted by tar on restore.
start_app
echo "app data to preserve" > "$work/scratch/app/data"
exec 20< <(tar -C "$work/scratch" -cf - app)
criu-image-streamer --images-dir "$work/images" --ext-file-fds fs.tar:20 --progress-fd 3 capture 3>"$work/capture.progress" | cat > "$work/img.cka" &
capture_pid=$!
exec 20<&-
wait_line "$work/capture.progress" socket-init
"$criu" dump --images-dir "$work/images" --stream --tree "$pid" -o dump.log || fail "criu dump"
wait "$capture_pid" || fail "capture exited non-zero"
mapfile -t lines <"$work/capture.progress"
[[ ${lines[0]} == socket-init && ${lines[1]} == checkpoint-start && ${lines[2]} == '{"shards":'* ]] || fail "capture progress: ${lines[*]}"
wait_gone
"$CKSTREAM" verify "$work/img.cka" >/dev/null || fail "captured archive does not verify"

rm -rf "$work/scratch/app"
exec 20> >(tar -C "$work/scratch" -xf -)
cat "$work/img.cka" | criu-image-streamer --images-dir "$work/images" --ext-file-fds fs.tar:20 --progress-fd 3 serve 3>"$work/serve.progress" &
serve_pid=$!
exec 20>&-
wait_line "$work/serve.progress" socket-init
mapfile -t lines <"$work/serve.progress"
[[ ${lines[0]} == '{"shards":'* && ${lines[1]} == socket-init ]] || fail "serve progress order: ${lines[*]}"
"$criu" restore --images-dir "$work/images" --stream -d -o restore.log || fail "criu restore"
wait "$serve_pid" || fail "serve exited non-zero"
check_alive_and_intact "after serve from a pipe"
for _ in $(seq 100); do [[ -f $work/scratch/app/data ]] && break; sleep 0.05; done
[[ $(cat "$work/scratch/app/data") == "app data to preserve" ]] || fail "external file not restored"

# Example 3: several shard fds.
pkill -KILL -s "$pid"; wait_gone
start_app
# One exec per fd: several redirections in one exec lose fds in bash.
exec 10>"$work/s0"
exec 11>"$work/s1"
exec 12>"$work/s2"
criu-image-streamer --images-dir "$work/images" --shard-fds 10,11,12 --progress-fd 3 capture 3>"$work/c3.progress" 2>"$work/c3.stderr" &
capture_pid=$!
exec 10>&-
exec 11>&-
exec 12>&-
wait_line "$work/c3.progress" socket-init
"$criu" dump --images-dir "$work/images" --stream --tree "$pid" -o dump.log || fail "criu dump (3 shards)"
wait "$capture_pid" || fail "3-shard capture exited non-zero: $(cat "$work/c3.stderr")"
wait_gone
exec 10< <(cat "$work/s0")
exec 11< <(cat "$work/s1")
exec 12< <(cat "$work/s2")
criu-image-streamer --shard-fds 10,11,12 --images-dir "$work/images" --progress-fd 3 serve 3>"$work/s3.progress" &
serve_pid=$!
exec 10<&-
exec 11<&-
exec 12<&-
wait_line "$work/s3.progress" socket-init
"$criu" restore --images-dir "$work/images" --stream -d -o restore.log || fail "criu restore (3 shards)"
wait "$serve_pid" || fail "3-shard serve exited non-zero"
check_alive_and_intact "after the 3-shard restore"

# Shards that are pipes: the capture splices CRIU's pages into them (no copy); every
# shard is read by its own cat, as the README's S3 example does with its uploaders.
pkill -KILL -s "$pid"; wait_gone
start_app
exec 10> >(cat >"$work/p0")
exec 11> >(cat >"$work/p1")
criu-image-streamer --images-dir "$work/images" --shard-fds 10,11 --progress-fd 3 capture 3>"$work/p2.progress" 2>"$work/p2.stderr" &
capture_pid=$!
exec 10>&-
exec 11>&-
wait_line "$work/p2.progress" socket-init
"$criu" dump --images-dir "$work/images" --stream --tree "$pid" -o dump.log || fail "criu dump (2 pipe shards)"
wait "$capture_pid" || fail "2-pipe capture exited non-zero: $(cat "$work/p2.stderr")"
wait_gone
for _ in $(seq 100); do [[ $(stat -c %s "$work/p0") -gt 0 && $(stat -c %s "$work/p1") -gt 0 ]] && break; sleep 0.05; done
sleep 0.2
exec 10<"$work/p0"
exec 11<"$work/p1"
criu-image-streamer --shard-fds 10,11 --images-dir "$work/images" --progress-fd 3 serve 3>"$work/p2s.progress" &
serve_pid=$!
exec 10<&-
exec 11<&-
wait_line "$work/p2s.progress" socket-init
"$criu" restore --images-dir "$work/images" --stream -d -o restore.log || fail "criu restore (2 pipe shards)"
wait "$serve_pid" || fail "2-pipe serve exited non-zero"
check_alive_and_intact "after the restore from 2 piped shards"

# Compressed through a pipe (chunks are compressed, so nothing is spliced).
pkill -KILL -s "$pid"; wait_gone
start_app
criu-image-streamer --images-dir "$work/images" --progress-fd 3 capture -c zstd 3>"$work/z.progress" | cat >"$work/z.cka" &
capture_pid=$!
wait_line "$work/z.progress" socket-init
"$criu" dump --images-dir "$work/images" --stream --tree "$pid" -o dump.log || fail "criu dump (zstd)"
wait "$capture_pid" || fail "zstd capture exited non-zero"
wait_gone
"$CKSTREAM" verify "$work/z.cka" >/dev/null || fail "zstd capture does not verify"
criu-image-streamer --images-dir "$work/images" --progress-fd 3 serve <"$work/z.cka" 3>"$work/zs.progress" &
serve_pid=$!
wait_line "$work/zs.progress" socket-init
"$criu" restore --images-dir "$work/images" --stream -d -o restore.log || fail "criu restore (zstd)"
wait "$serve_pid" || fail "zstd serve exited non-zero"
check_alive_and_intact "after the zstd restore"

# The reader of the shard pipe goes away in the middle of the pages: the capture fails
# (non-zero), CRIU's dump fails with it, and the application runs on untouched.
(
  criu-image-streamer --images-dir "$work/images" --progress-fd 3 capture 3>"$work/cut.progress" 2>"$work/cut.stderr" | head -c 3000000 >/dev/null
  exit "${PIPESTATUS[0]}"
) &
capture_pid=$!
wait_line "$work/cut.progress" socket-init
if "$criu" dump --images-dir "$work/images" --stream --tree "$pid" -o dump.log 2>/dev/null; then fail "dump into a pipe closed mid-way succeeded"; fi
if wait "$capture_pid"; then fail "capture exited 0 after its pipe closed"; fi
check_alive_and_intact "after the shard pipe closed mid-dump"

# Example 2: extract to a directory; the result is a plain CRIU image directory.
mkdir -p "$work/extracted"
cat "$work/img.cka" | criu-image-streamer --images-dir "$work/extracted" extract 2>/dev/null || fail "extract"
[[ -s $work/extracted/inventory.img && -n $(ls "$work/extracted"/pages-*.img) ]] || fail "extract wrote no images"
cmp <("$CKSTREAM" cat "$work/img.cka" criu/inventory.img) "$work/extracted/inventory.img" || fail "extracted inventory differs"

# A dump CRIU does not finish is never committed: capture fails, the stream has no footer.
criu-image-streamer --images-dir "$work/images" capture 2>/dev/null >"$work/failed.cka" &
capture_pid=$!
sleep 0.3
CRIU_FAULT=3 "$criu" dump --images-dir "$work/images" --stream --tree "$pid" -o dump.log 2>/dev/null && fail "CRIU_FAULT dump succeeded"
if wait "$capture_pid"; then fail "capture exited 0 after a failed dump"; fi
if "$CKSTREAM" verify "$work/failed.cka" 2>/dev/null; then fail "failed capture verifies"; fi
check_alive_and_intact "after a failed dump"

# Encrypted and signed: capture to a recipient's key, serve with it (from the
# environment: keys never go on a command line CRIU or ps could show), trusting the signer.
"$CKSTREAM" key generate -o "$work/signer" 2>/dev/null
"$CKSTREAM" key generate -o "$work/recipient" 2>/dev/null
criu-image-streamer --images-dir "$work/images" --progress-fd 3 capture --sign "$work/signer" --encrypt-to "$work/recipient.pub" >"$work/enc.cka" 3>"$work/encc.progress" &
capture_pid=$!
wait_line "$work/encc.progress" socket-init
"$criu" dump --images-dir "$work/images" --stream --tree "$pid" -o dump.log || fail "criu dump (encrypted)"
wait "$capture_pid" || fail "encrypted capture exited non-zero"
wait_gone
if "$CKSTREAM" ls "$work/enc.cka" >/dev/null 2>&1; then fail "an encrypted capture opens without its key"; fi
export CKSTREAM_KEY=$work/recipient CKSTREAM_TRUSTED_KEYS=$work/signer.pub
criu-image-streamer --images-dir "$work/images" --progress-fd 3 serve <"$work/enc.cka" 3>"$work/enc.progress" &
serve_pid=$!
wait_line "$work/enc.progress" socket-init
"$criu" restore --images-dir "$work/images" --stream -d -o restore.log || fail "criu restore (encrypted)"
wait "$serve_pid" || fail "encrypted serve exited non-zero"
unset CKSTREAM_KEY CKSTREAM_TRUSTED_KEYS
check_alive_and_intact "after the encrypted restore"
echo "criu-image-streamer README pipelines: all passed"

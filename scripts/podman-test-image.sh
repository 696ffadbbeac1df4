#!/usr/bin/env bash
# Build the tiny local container image the podman tests and benchmarks use, without a
# registry: Debian's static busybox plus a static build of tests/progs/memtest.c.
# Idempotent: does nothing when the image exists and was built from this memtest.c (its
# sha256 is a label of the image). Concurrent runs (tests in parallel) take turns.
#
#   scripts/podman-test-image.sh [IMAGE]     (default localhost/ckstream-memtest)
#
# Podman options the storage needs (e.g. --root) can be passed in PODMAN_OPTS.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
image=${1:-localhost/ckstream-memtest}
src="$here/../tests/progs/memtest.c"
# shellcheck disable=SC2086
podman_() { podman ${PODMAN_OPTS:-} "$@"; }

# One build at a time: a second caller must not see (or remove) a half-built image.
exec 9>"${TMPDIR:-/tmp}/ckstream-podman-test-image.lock"
flock 9

want=$(sha256sum "$src" | cut -d' ' -f1)
if podman_ image exists "$image"; then
  have=$(podman_ image inspect -f '{{index .Config.Labels "ckstream.memtest.sha256"}}' "$image" 2>/dev/null || true)
  [[ $have == "$want" ]] && exit 0
  podman_ rmi -f "$image" >/dev/null
fi

[[ -x /bin/busybox ]] || { echo "podman-test-image: /bin/busybox missing (scripts/install-deps.sh --with-podman)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,etc,tmp,data,opt,app,dev,proc,sys,run,var/log}
chmod 1777 "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for tool in sh ls cat cp mv rm mkdir rmdir ln chmod chown touch sleep sync dd head tail \
            truncate sha256sum stat find mknod mkfifo test echo kill true false sort readlink cut grep wc xargs; do
  ln -s busybox "$root/bin/$tool"
done
gcc -O2 -static -o "$root/bin/memtest" "$src"
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
echo original > "$root/app/existing.txt"
echo 'lower file' > "$root/opt/keep.txt"
mkdir -p "$root/opt/recreate" "$root/opt/gone/sub"
echo old > "$root/opt/recreate/old.txt"
echo bye > "$root/opt/gone/sub/file.txt"
echo bye > "$root/data/delete-me.txt"
tar -C "$root" --numeric-owner --owner=0 --group=0 -c . \
  | podman_ import -q --change 'CMD ["/bin/sh"]' --change "LABEL ckstream.memtest.sha256=$want" \
      - "$image" >/dev/null
echo "podman-test-image: built $image"

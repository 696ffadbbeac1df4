#!/usr/bin/env bash
# shellcheck disable=SC2016 # backticks in markdown strings; $ meant for the container's shell
# podman-bench.sh — podman's own checkpoint export vs `ckstream podman checkpoint`, and
# the restores, side by side in one run, on XFS (reflink=1) and btrfs loopbacks.
#
# Per filesystem in FSES: a sparse LOOP_GIB file under LOOP_DIR -> mkfs -> mount; podman's
# whole world is put on it through private config files exported for every podman and
# ckstream command of the run:
#   CONTAINERS_STORAGE_CONF  [storage] driver=overlay, graphroot=$MNT/storage, runroot=$MNT/run
#   CONTAINERS_CONF          a copy of /usr/share/containers/containers.conf with
#                            [engine] tmp_dir=$MNT/libpod-tmp (podman's --tmpdir)
#   TMPDIR                   $MNT/tmp (Go's temp dir: podman's import scratch files)
# and the archives are written to $MNT too, so every copy is a same-FS copy and reflinks
# are possible. `podman info` must report the graphRoot (checked). The test image
# (scripts/podman-test-image.sh: busybox + static memtest) is built in that storage.
#
# Workload (identical for every case): a FRESH container, `podman run --ulimit nofile=...
# --ulimit nproc=... -e MEMTEST_FILL=$MEMTEST_FILL IMAGE memtest $MIB /tmp/hb $CHILDREN`
# (1 GiB of mixed-compressibility memory by default), then inside it (`podman exec`):
# NFILES x FILE_MIB MiB files from /dev/urandom in /data/big (default 24 x 128 MiB = 3 GiB),
# SMALL_FILES small files (1-16 KiB), a modified lower-layer file, a deleted file, a deleted
# directory tree, a deleted+re-created directory, a chmod'ed lower directory, a symlink and
# a 16 MiB sparse file with 1 MiB of data; then `sync`.
# Fairness: every checkpoint case gets its own fresh container with the same workload and is
# a normal (stopping) checkpoint — no --leave-running, so no case profits from another's
# leftovers (page cache, reflinked extents, kept CRIU images). Caches are dropped
# (sync; echo 3 > drop_caches) right before every timed checkpoint and every timed restore.
#
# Cases (CASES; the order rotates by one each rep):
#   podman-none     `podman container checkpoint -e X.tar --compress none --print-stats CTR`
#   podman-zstd     `podman container checkpoint -e X.tar.zst --compress zstd --print-stats CTR`
#   ck-podman-none  `ckstream podman checkpoint CTR -o X.tar --format podman -c none --json`
#   ck-cka-none     `ckstream podman checkpoint CTR -o X.cka --format cka -c none --json`
#   ck-cka-zstd     `ckstream podman checkpoint CTR -o X.cka --format cka -c $CK_ZSTD --json`
#   ck-cka-zstd3    the same with an explicit -c zstd:3 (podman's zstd level); ck-FMT-zstdN = -c zstd:N
#                   (ckstream since a2ff349 reads plain `zstd` as level 3 in both formats, so with such a
#                   binary ck-cka-zstd and ck-cka-zstd3 are the same setting; CASES=... ck-cka-zstd1 ... for level 1)
#   ck-podman-zstd  `ckstream podman checkpoint CTR -o X.tar.zst --format podman -c $CK_ZSTD --json`
# Restores (container removed with `podman rm -f` first, caches dropped):
#   podman archives (podman-*, ck-podman-*):  `podman container restore --import X --print-stats`
#   every archive:  `ckstream podman restore X --json`
#     (a .cka: its rootfs diff and CRIU images placed into the new container's storage,
#     --apply-diff storage; a podman tar: checked, then `podman container restore --import`)
#   ck-cka-none additionally `ckstream podman restore X --verify-rootfs-after-start --json`
#     (op restore-ckstream-late: the reflinked rootfs is checked after the container runs)
# After every restore: the container runs, memtest's heartbeat advances, SIGUSR1 -> /tmp/hb.verify
# says verify=ok (full memory checksum), sha256 of /data/big/f$VERIFY_FILE and a digest of
# all small files equal the pre-checkpoint values, all NFILES big files are there with the
# right size (FULL_VERIFY=1: sha256 of every big file). Any mismatch aborts the run.
# Informational only (podman's known rootfs-diff bugs): whether the modified lower file and
# the re-created directory survived ("sem" column).
#
# Timings: "wall" = date +%s.%N around the command. podman's --print-stats gives its own
# total and the runtime (runc/CRIU) part; ckstream's JSON gives podman_checkpoint_seconds
# (`podman container checkpoint --keep` in place, CRIU included) and archive_seconds (the
# one-pass archive/diff writing), convert_seconds on restore. The "diff part" compared
# below is podman: wall - runtime_checkpoint_duration (diff tar + outer tar [+ zstd]),
# ckstream: archive_seconds. "new space" = df used after - before the checkpoint (after sync).
# Medians over REPS -> markdown on stdout and bench/out/podman-bench-<stamp>.md, every run
# in bench/out/podman-bench-<stamp>.tsv, logs of the run in bench/out/podman-bench-<stamp>.log.d/.
#
# Env: FSES ("xfs btrfs") REPS (1) MIB (1024) CHILDREN (0) MEMTEST_FILL (mixed)
#      DIFF_GIB (3) FILE_MIB (128) NFILES (DIFF_GIB*1024/FILE_MIB) SMALL_FILES (200)
#      CASES (all seven above) CK_ZSTD (zstd = ckstream's default level)
#      NETWORK (bridge; "none" avoids CNI) LOOP_GIB (24) LOOP_DIR (/var/tmp) DROP_CACHES (1)
#      FULL_VERIFY (0) VERIFY_FILE (7) TIMEOUT (1200 s per command)
#      SUMMARY_FROM=bench/out/podman-bench-X.tsv: only rewrite the report of an earlier or
#      interrupted run from its TSV (an interim report is also written after each filesystem)
#      CKSTREAM ($REPO/target/release/ckstream — copy it elsewhere if the tree may be rebuilt)
#      NO_BUILD (1 here: the binary is not rebuilt unless NO_BUILD= is given)
# Must run as root. Everything (containers, mounts, loop files) is removed on exit/Ctrl-C.

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

FSES=${FSES:-"xfs btrfs"}
REPS=${REPS:-1}
MIB=${MIB:-1024}
CHILDREN=${CHILDREN:-0}
MEMTEST_FILL=${MEMTEST_FILL:-mixed}
DIFF_GIB=${DIFF_GIB:-3}
FILE_MIB=${FILE_MIB:-128}
NFILES=${NFILES:-$((DIFF_GIB * 1024 / FILE_MIB))}
SMALL_FILES=${SMALL_FILES:-200}
CASES=${CASES:-"podman-none podman-zstd ck-podman-none ck-cka-none ck-cka-zstd ck-cka-zstd3 ck-podman-zstd"}
CK_ZSTD=${CK_ZSTD:-zstd}
NETWORK=${NETWORK:-bridge}
LOOP_GIB=${LOOP_GIB:-24}
LOOP_DIR=${LOOP_DIR:-/var/tmp}
DROP_CACHES=${DROP_CACHES:-1}
FULL_VERIFY=${FULL_VERIFY:-0}
VERIFY_FILE=${VERIFY_FILE:-7}
TIMEOUT=${TIMEOUT:-1200}
IMAGE=localhost/ckstream-memtest
CTR=ckstream-podman-bench
LOGD=$OUTDIR/podman-bench-$STAMP.log.d
((NFILES >= VERIFY_FILE)) || VERIFY_FILE=1

MNT="" LOOPIMG="" FSDIR=""
cold() { if [[ $DROP_CACHES == 1 ]]; then drop_caches; else sync; fi; }

# Remove our containers/images (only in the private storage), unmount everything under
# the loop mount, delete the loop file.
teardown_fs() {
	[[ -n $MNT ]] || return 0
	set +e
	if [[ -n ${CONTAINERS_STORAGE_CONF:-} ]]; then
		timeout 180 podman rm -af -t 0 >/dev/null 2>&1
		timeout 180 podman rmi -af >/dev/null 2>&1
	fi
	local i
	for i in 1 2 3 4 5; do
		mountpoint -q "$MNT" || break
		umount -R "$MNT" 2>/dev/null && break
		sleep 1
	done
	mountpoint -q "$MNT" && { log "warning: $MNT busy, lazy unmount"; umount -R -l "$MNT"; }
	[[ -n $LOOPIMG ]] && rm -f "$LOOPIMG"
	[[ -n $FSDIR ]] && rm -rf "$FSDIR"
	unset CONTAINERS_STORAGE_CONF CONTAINERS_CONF TMPDIR
	MNT="" LOOPIMG="" FSDIR=""
	set -e
}
on_exit teardown_fs

[[ $(id -u) == 0 ]] || die "must run as root (mount, podman checkpoint)"
need_tools podman runc mkfs.xfs mkfs.btrfs jq timeout gcc mountpoint
NO_BUILD=${NO_BUILD-1} need_ckstream
mkdir -p "$LOGD"
CK_SUM=$(sha256sum "$CKSTREAM" | cut -c1-12)
CK_DATE=$(date -u -r "$CKSTREAM" '+%Y-%m-%d %H:%M UTC')
LOAD_START=$(loadavg)
log "load average at start: $LOAD_START; ckstream $CKSTREAM (sha256 $CK_SUM, built $CK_DATE)"

COLS="fs rep case op tool wall ck_podman_s ck_archive_s ck_convert_s ck_seconds pm_total_s pm_runtime_s archive_bytes cloned_bytes data_bytes space_bytes sem load1 ck_apply_s ck_running_s ck_verified_after_s"
echo "$COLS" | tr ' ' '\t' >"$TSV"
row() { printf '%s\n' "$@" | paste -sd'\t' >>"$TSV"; }
{
	echo "# podman-bench $STAMP"
	echo
	echo "podman $(podman --version | awk '{print $3}'), $(runc --version | head -1), criu $(criu --version 2>/dev/null | head -1 | awk '{print $2}'); kernel $(uname -r); $(nproc) CPUs."
	echo "ckstream $CKSTREAM (sha256 ${CK_SUM}…, built $CK_DATE; tree at $CK_REV)."
	echo "Workload per case (fresh container each time, normal stopping checkpoint): memtest $MIB MiB + $CHILDREN children,"
	echo "MEMTEST_FILL=$MEMTEST_FILL; rootfs diff $NFILES × $FILE_MIB MiB urandom + $SMALL_FILES small files + deletions/chmod/symlink/sparse;"
	echo "network $NETWORK. Storage (graphroot, runroot, libpod tmp_dir, TMPDIR) and archives on a ${LOOP_GIB} GiB loop FS in $LOOP_DIR."
	echo "Caches dropped before every checkpoint and restore: $([[ $DROP_CACHES == 1 ]] && echo yes || echo no). REPS=$REPS (medians; case order rotates each rep)."
	echo "Every restore verified: running, heartbeat advancing, memtest verify=ok, sha256 of a big file and of all small files, sizes of all big files$([[ $FULL_VERIFY == 1 ]] && echo ', sha256 of every big file')."
	echo "Load average start: $LOAD_START. GB = 1e9 bytes."
} >"$TSV.header"

# ------------------------------------------------------------------ per-FS setup
setup_fs() {
	local fs=$1
	FSDIR=$(mktemp -d "$LOOP_DIR/podman-bench.$fs.XXXXXX")
	LOOPIMG=$FSDIR/$fs.img
	MNT=$FSDIR/mnt
	mkdir -p "$MNT"
	truncate -s "${LOOP_GIB}G" "$LOOPIMG"
	case $fs in
	xfs) mkfs.xfs -q -m reflink=1 "$LOOPIMG" ;;
	btrfs) mkfs.btrfs -q "$LOOPIMG" >&2 ;;
	*) die "unknown filesystem $fs" ;;
	esac
	mount -o loop "$LOOPIMG" "$MNT"
	mkdir -p "$MNT/storage" "$MNT/run" "$MNT/tmp" "$MNT/libpod-tmp" "$MNT/archives"
	printf '[storage]\ndriver = "overlay"\ngraphroot = "%s/storage"\nrunroot = "%s/run"\n' "$MNT" "$MNT" >"$MNT/storage.conf"
	if grep -q '^\[engine\]' /usr/share/containers/containers.conf 2>/dev/null; then
		sed "s|^\[engine\]\$|[engine]\ntmp_dir = \"$MNT/libpod-tmp\"|" /usr/share/containers/containers.conf >"$MNT/containers.conf"
	else
		printf '[engine]\ntmp_dir = "%s/libpod-tmp"\n' "$MNT" >"$MNT/containers.conf"
	fi
	export CONTAINERS_STORAGE_CONF=$MNT/storage.conf CONTAINERS_CONF=$MNT/containers.conf TMPDIR=$MNT/tmp
	local gr
	gr=$(podman info --format '{{.Store.GraphRoot}}')
	[[ $gr == "$MNT/storage" ]] || die "podman info shows graphRoot $gr, not $MNT/storage"
	log "$fs: loop $LOOPIMG (${LOOP_GIB} GiB sparse) on $MNT; podman graphRoot $gr, driver $(podman info --format '{{.Store.GraphDriverName}}')"
	"$REPO/scripts/podman-test-image.sh" "$IMAGE" >&2
	podman image exists "$IMAGE" || die "image $IMAGE not built"
}

# ------------------------------------------------------------------ workload
pexec() { podman exec "$CTR" /bin/sh -c "$1"; }

heartbeat() { podman exec "$CTR" /bin/cat /tmp/hb 2>/dev/null | tr -d '\n' || true; }

# Sets SHA_BIG SMALL_DIGEST for the verification after restore.
make_workload() {
	podman rm -f -t 0 "$CTR" >/dev/null 2>&1 || true
	podman run -d --name "$CTR" --network "$NETWORK" \
		--ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
		-e MEMTEST_FILL="$MEMTEST_FILL" "$IMAGE" /bin/memtest "$MIB" /tmp/hb "$CHILDREN" >/dev/null
	local i hb=""
	for i in $(seq 1200); do
		hb=$(heartbeat)
		[[ -n $hb ]] && break
		sleep 0.2
	done
	[[ -n $hb ]] || die "memtest did not start in the container in 240 s"
	pexec "
		set -e
		mkdir -p /data/big /data/small
		i=1; while test \$i -le $NFILES; do
			dd if=/dev/urandom of=/data/big/f\$i bs=1M count=$FILE_MIB 2>/dev/null; i=\$((i+1)); done
		i=1; while test \$i -le $SMALL_FILES; do
			dd if=/dev/urandom of=/data/small/s\$i bs=\$(( (i % 16 + 1) * 1024 )) count=1 2>/dev/null; i=\$((i+1)); done
		echo modified >> /app/existing.txt
		rm -f /data/delete-me.txt
		rm -rf /opt/gone
		rm -rf /opt/recreate; mkdir /opt/recreate; echo new > /opt/recreate/new.txt
		chmod 0750 /opt
		ln -s big/f1 /data/link
		truncate -s 16M /data/sparse
		dd if=/dev/urandom of=/data/sparse bs=1M count=1 seek=8 conv=notrunc 2>/dev/null
		sync"
	SHA_BIG=$(pexec "sha256sum /data/big/f$VERIFY_FILE" | cut -d' ' -f1)
	SMALL_DIGEST=$(pexec "cd /data/small && sha256sum * | sha256sum" | cut -d' ' -f1)
	if [[ $FULL_VERIFY == 1 ]]; then
		ALL_DIGEST=$(pexec "cd /data/big && sha256sum * | sha256sum" | cut -d' ' -f1)
	fi
}

# verify_restored WHAT: aborts unless the restored container is alive and intact.
# Prints the informational rootfs-semantics string.
verify_restored() {
	local what=$1 i hb0 hb1 st v
	st=$(podman inspect -f '{{.State.Status}}' "$CTR" 2>/dev/null || echo missing)
	[[ $st == running ]] || die "$what: container is $st after restore"
	hb0=$(heartbeat)
	[[ -n $hb0 ]] || die "$what: no heartbeat file after restore"
	pexec 'rm -f /tmp/hb.verify; kill -USR1 $(cat /tmp/hb.pid)'
	for i in $(seq 900); do
		v=$(podman exec "$CTR" /bin/head -1 /tmp/hb.verify 2>/dev/null || true)
		[[ -n $v ]] && break
		sleep 0.2
	done
	[[ $v == verify=ok ]] || die "$what: MEMORY VERIFICATION FAILED: '${v:-no hb.verify after 180 s}'"
	for i in $(seq 100); do
		hb1=$(heartbeat)
		[[ -n $hb1 ]] && ((hb1 > hb0)) && break
		sleep 0.1
	done
	[[ -n $hb1 ]] && ((hb1 > hb0)) || die "$what: heartbeat stuck at $hb0 -> ${hb1:-?}"
	local sha small n
	sha=$(pexec "sha256sum /data/big/f$VERIFY_FILE" | cut -d' ' -f1)
	[[ $sha == "$SHA_BIG" ]] || die "$what: /data/big/f$VERIFY_FILE sha256 $sha != $SHA_BIG"
	small=$(pexec "cd /data/small && sha256sum * | sha256sum" | cut -d' ' -f1)
	[[ $small == "$SMALL_DIGEST" ]] || die "$what: small files digest differs"
	n=$(pexec "ls -l /data/big | grep -c ' $((FILE_MIB * 1048576)) '" || true)
	[[ $n == "$NFILES" ]] || die "$what: $n of $NFILES big files with the right size"
	if [[ $FULL_VERIFY == 1 ]]; then
		[[ $(pexec "cd /data/big && sha256sum * | sha256sum" | cut -d' ' -f1) == "$ALL_DIGEST" ]] ||
			die "$what: big files digest differs"
	fi
	local sem=""
	if [[ $(pexec 'cat /app/existing.txt' 2>/dev/null | tail -1) == modified ]]; then sem+="lowermod=ok"; else sem+="lowermod=LOST"; fi
	if [[ $(pexec 'cat /opt/recreate/new.txt' 2>/dev/null) == new ]]; then sem+=",recreated=ok"; else sem+=",recreated=LOST"; fi
	if pexec 'test ! -e /opt/gone && test ! -e /data/delete-me.txt'; then sem+=",deleted=ok"; else sem+=",deleted=BACK"; fi
	if [[ $(pexec 'stat -c %a /opt') == 750 ]]; then sem+=",chmod=ok"; else sem+=",chmod=LOST"; fi
	echo "$sem"
}

# ------------------------------------------------------------------ one case
# run_case FS REP CASE
run_case() {
	local fs=$1 rep=$2 cs=$3 arch d t0 t1 wall sp0 sp1 j
	d=$LOGD/$fs-$rep-$cs
	mkdir -p "$d"
	case $cs in
	podman-none | ck-podman-none) arch=$MNT/archives/$cs.tar ;;
	podman-zstd | ck-podman-zstd*) arch=$MNT/archives/$cs.tar.zst ;;
	ck-cka-*) arch=$MNT/archives/$cs.cka ;;
	*) die "unknown case $cs" ;;
	esac
	log "$fs rep $rep $cs: creating container + workload"
	make_workload
	cold
	sync; sp0=$(used_bytes "$MNT")
	log "$fs rep $rep $cs: checkpoint"
	t0=$(now)
	local rc=0
	case $cs in
	podman-none | podman-zstd)
		timeout "$TIMEOUT" podman container checkpoint -e "$arch" --compress "${cs#podman-}" --print-stats "$CTR" \
			>"$d/ckpt.out" 2>"$d/ckpt.err" || rc=$?
		;;
	ck-*)
		local fmt=${cs#ck-}
		fmt=${fmt%-*}
		local c=none
		[[ $cs == *-zstd ]] && c=$CK_ZSTD
		[[ $cs =~ -zstd([0-9]+)$ ]] && c=zstd:${BASH_REMATCH[1]}
		timeout "$TIMEOUT" "$CKSTREAM" podman checkpoint "$CTR" -o "$arch" --format "$fmt" -c "$c" -q --json \
			>"$d/ckpt.out" 2>"$d/ckpt.err" || rc=$?
		;;
	esac
	t1=$(now)
	wall=$(fsub "$t1" "$t0")
	if ((rc != 0)); then
		tail -20 "$d/ckpt.err" >&2
		die "$fs $cs: checkpoint failed (exit $rc)"
	fi
	sync; sp1=$(used_bytes "$MNT")
	local abytes
	abytes=$(stat -c %s "$arch")
	if [[ $cs == podman-* ]]; then
		j=$(jq -r '[(.podman_checkpoint_duration // 0) / 1e6, ([.container_statistics[]?.runtime_checkpoint_duration // 0] | add // 0) / 1e6] | @tsv' "$d/ckpt.out" 2>/dev/null || printf '\t')
		local pt pr
		IFS=$'\t' read -r pt pr <<<"$j"
		row "$fs" "$rep" "$cs" checkpoint podman "$wall" "" "" "" "" "$pt" "$pr" "$abytes" "" "" "$((sp1 - sp0))" "" "$(cut -d' ' -f1 /proc/loadavg)"
		log "$fs rep $rep $cs: checkpoint ${wall}s (podman ${pt}s, runtime ${pr}s), $abytes B"
	else
		j=$(jq -r '[.podman_checkpoint_seconds, .archive_seconds, .seconds, .cloned_bytes, .data_bytes] | @tsv' "$d/ckpt.out")
		local cp ca cs_ cb db
		IFS=$'\t' read -r cp ca cs_ cb db <<<"$j"
		row "$fs" "$rep" "$cs" checkpoint ckstream "$wall" "$cp" "$ca" "" "$cs_" "" "" "$abytes" "$cb" "$db" "$((sp1 - sp0))" "" "$(cut -d' ' -f1 /proc/loadavg)"
		log "$fs rep $rep $cs: checkpoint ${wall}s (podman in place ${cp}s, archive ${ca}s), $abytes B, reflinked $cb B"
	fi
	if [[ $cs == ck-cka-none && $DROP_CACHES == 1 ]]; then
		# The disk's share of a cold restore: one sequential read of the archive.
		drop_caches
		t0=$(now)
		cat "$arch" >/dev/null
		wall=$(fsub "$(now)" "$t0")
		row "$fs" "$rep" "$cs" seqread cat "$wall" "" "" "" "" "" "" "$abytes" "" "" "" "" "$(cut -d' ' -f1 /proc/loadavg)"
		log "$fs rep $rep $cs: one cold sequential read of the archive ${wall}s"
	fi
	# Restores.
	local tools=()
	case $cs in
	podman-* | ck-podman-*) tools=(podman ckstream) ;;
	ck-cka-none) tools=(ckstream ckstream-late) ;;
	ck-cka-*) tools=(ckstream) ;;
	esac
	local tool sem
	for tool in "${tools[@]}"; do
		podman rm -f -t 0 "$CTR" >/dev/null 2>&1 || true
		cold
		log "$fs rep $rep $cs: restore ($tool)"
		rc=0
		t0=$(now)
		if [[ $tool == podman ]]; then
			timeout "$TIMEOUT" podman container restore --import "$arch" --print-stats \
				>"$d/restore-$tool.out" 2>"$d/restore-$tool.err" || rc=$?
		else
			local late=()
			[[ $tool == ckstream-late ]] && late=(--verify-rootfs-after-start)
			timeout "$TIMEOUT" "$CKSTREAM" podman restore "$arch" "${late[@]}" -q --json \
				>"$d/restore-$tool.out" 2>"$d/restore-$tool.err" || rc=$?
		fi
		t1=$(now)
		wall=$(fsub "$t1" "$t0")
		if ((rc != 0)); then
			tail -20 "$d/restore-$tool.err" >&2
			die "$fs $cs: restore with $tool failed (exit $rc)"
		fi
		sem=$(verify_restored "$fs $cs restore ($tool)")
		if [[ $tool == podman ]]; then
			j=$(jq -r '[(.podman_restore_duration // 0) / 1e6, ([.container_statistics[]?.runtime_restore_duration // 0] | add // 0) / 1e6] | @tsv' "$d/restore-$tool.out" 2>/dev/null || printf '\t')
			local pt pr
			IFS=$'\t' read -r pt pr <<<"$j"
			row "$fs" "$rep" "$cs" "restore-$tool" podman "$wall" "" "" "" "" "$pt" "$pr" "$abytes" "" "" "" "$sem" "$(cut -d' ' -f1 /proc/loadavg)"
			log "$fs rep $rep $cs: restore (podman) ${wall}s (podman ${pt}s, runtime ${pr}s), verified; $sem"
		else
			j=$(jq -r '[.convert_seconds, .seconds, .rootfs_apply_seconds, .running_seconds, .verified_after_start_seconds] | @tsv' "$d/restore-$tool.out")
			local cc cs2 ap run va
			IFS=$'\t' read -r cc cs2 ap run va <<<"$j"
			row "$fs" "$rep" "$cs" "restore-$tool" ckstream "$wall" "" "" "$cc" "$cs2" "" "" "$abytes" "" "" "" "$sem" "$(cut -d' ' -f1 /proc/loadavg)" "$ap" "$run" "$va"
			log "$fs rep $rep $cs: restore ($tool) ${wall}s (convert ${cc}s, rootfs placed ${ap}s, running after ${run}s, verified after the start ${va:-–}s), verified; $sem"
		fi
	done
	podman rm -f -t 0 "$CTR" >/dev/null 2>&1 || true
	rm -f "$arch"
}

# ------------------------------------------------------------------ main

# ------------------------------------------------------------------ summary
# med FS CASE OP COLUMN: median over reps (empty if none)
med() { tsv_med "$TSV" "$4" fs="$1" case="$2" op="$3"; }
first() { # FS CASE OP COLUMN: first non-empty value
	awk -F'\t' -v fs="$1" -v cs="$2" -v op="$3" -v c="$4" '
		NR == 1 { for (i = 1; i <= NF; i++) if ($i == c) col = i; next }
		$1 == fs && $3 == cs && $4 == op && $col != "" { print $col; exit }' "$TSV"
}
gb() { [[ -n ${1:-} ]] && awk -v v="$1" 'BEGIN{printf "%.3f", v/1e9}' || printf '–'; }
nb() { [[ -n ${1:-} ]] && printf '%s' "$1" || printf '–'; }

cmd_of() {
	case $1 in
	podman-none) echo '`podman container checkpoint -e X.tar --compress none`' ;;
	podman-zstd) echo '`podman container checkpoint -e X.tar.zst --compress zstd`' ;;
	ck-podman-none) echo '`ckstream podman checkpoint --format podman -c none`' ;;
	ck-cka-none) echo '`ckstream podman checkpoint --format cka -c none`' ;;
	ck-cka-zstd) echo "\`ckstream podman checkpoint --format cka -c $CK_ZSTD\`" ;;
	ck-podman-zstd) echo "\`ckstream podman checkpoint --format podman -c $CK_ZSTD\`" ;;
	ck-*-zstd[0-9]*) local f=${1#ck-}; echo "\`ckstream podman checkpoint --format ${f%-*} -c zstd:${1##*-zstd}\`" ;;
	esac
}
rcmd_of() {
	case $1 in
	restore-podman) echo '`podman container restore --import`' ;;
	restore-ckstream) echo '`ckstream podman restore`' ;;
	restore-ckstream-late) echo '`ckstream podman restore --verify-rootfs-after-start`' ;;
	esac
}
# diff part: podman wall - runtime; ckstream archive_seconds
diff_part() {
	local fs=$1 cs=$2
	if [[ $cs == podman-* ]]; then
		fsub "$(med "$fs" "$cs" checkpoint wall)" "$(med "$fs" "$cs" checkpoint pm_runtime_s)"
	else
		med "$fs" "$cs" checkpoint ck_archive_s
	fi
}
inplace_part() {
	local fs=$1 cs=$2
	if [[ $cs == podman-* ]]; then med "$fs" "$cs" checkpoint pm_runtime_s; else med "$fs" "$cs" checkpoint ck_podman_s; fi
}

write_summary() {
{
	cat "$TSV.header"
	echo "Load average end: $LOAD_END. Filesystems done: ${FS_DONE[*]:-none}."
	for fs in "${FS_DONE[@]}"; do
		P_CW=$(med "$fs" podman-none checkpoint wall)
		P_DP=$(diff_part "$fs" podman-none)
		P_RW=$(med "$fs" podman-none restore-podman wall)
		P_RR=$(med "$fs" podman-none restore-podman pm_runtime_s)
		P_AB=$(med "$fs" podman-none checkpoint archive_bytes)
		echo
		echo "## $fs"
		echo
		echo "### Checkpoint"
		echo
		echo "| case | command | wall s | × vs podman none | in-place checkpoint s | diff/archive part s | diff part × vs podman none | archive bytes | GB | reflinked GB | new space GB |"
		echo "|---|---|---|---|---|---|---|---|---|---|---|"
		for cs in "${CASE_LIST[@]}"; do
			w=$(med "$fs" "$cs" checkpoint wall)
			[[ -n $w ]] || continue
			dp=$(diff_part "$fs" "$cs")
			ab=$(med "$fs" "$cs" checkpoint archive_bytes)
			echo "| $cs | $(cmd_of "$cs") | $(f 2 "$w") | $(div "$P_CW" "$w" 1) | $(f 2 "$(inplace_part "$fs" "$cs")") | $(f 2 "$dp") | $(div "$P_DP" "$dp" 1) |" \
				"$(nb "$ab") | $(gb "$ab") | $(gb "$(med "$fs" "$cs" checkpoint cloned_bytes)") | $(gb "$(med "$fs" "$cs" checkpoint space_bytes)") |"
		done
		echo
		echo "in-place checkpoint: podman = runtime (runc/CRIU) checkpoint duration from --print-stats; ckstream = podman_checkpoint_seconds"
		echo "(\`podman container checkpoint --keep\`, podman + runc + CRIU). diff/archive part: podman = wall − runtime duration"
		echo "(rootfs-diff.tar + outer tar [+ zstd]); ckstream = archive_seconds (one pass, reflinks)."
		echo
		echo "### Restore"
		echo
		echo "| archive from | restore command | wall s | × vs podman none | ckstream pre-pass s | rootfs placed s | running after s | × vs podman none | checked after the start s | podman internal s | runtime (CRIU) restore s | wall − runtime s | (wall − runtime) × vs podman none | rootfs semantics |"
		echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
		for cs in "${CASE_LIST[@]}"; do
			for op in restore-podman restore-ckstream restore-ckstream-late; do
				w=$(med "$fs" "$cs" "$op" wall)
				[[ -n $w ]] || continue
				rr=$(med "$fs" "$cs" "$op" pm_runtime_s)
				nr=""
				[[ -n $rr ]] && nr=$(fsub "$w" "$rr")
				run=$(med "$fs" "$cs" "$op" ck_running_s)
				[[ -n $run ]] || run=$w
				echo "| $cs | $(rcmd_of "$op") | $(f 2 "$w") | $(div "$P_RW" "$w" 1) | $(f 2 "$(med "$fs" "$cs" "$op" ck_convert_s)") |" \
					"$(f 2 "$(med "$fs" "$cs" "$op" ck_apply_s)") | $(f 2 "$run") | $(div "$P_RW" "$run" 1) | $(f 2 "$(med "$fs" "$cs" "$op" ck_verified_after_s)") |" \
					"$(f 2 "$(med "$fs" "$cs" "$op" pm_total_s)") | $(f 2 "$rr") | $(f 2 "$nr") | $(div "$(fsub "$P_RW" "$P_RR")" "$nr" 1) | $(first "$fs" "$cs" "$op" sem) |"
			done
		done
		echo
		echo "rootfs placed: rootfs_apply_seconds (writing the diff and the CRIU images into the new container's storage, verification included"
		echo "unless checked after the start). running after: ckstream's running_seconds (the container runs; podman's restore has returned),"
		echo "the wall time for plain podman. checked after the start: the reflinked rootfs chunks read back and checked while the container runs."
		echo "podman internal / runtime restore: from \`--print-stats\` (only for plain podman restores; \`ckstream podman restore\` runs podman without it)."
		echo "ckstream pre-pass: convert_seconds — on podman's kernel overlay storage the stub export of a .cka, and for a podman archive"
		echo "its import into a temporary .cka beside it (reflinks when uncompressed and block-aligned, as ckstream's podman format is) —"
		echo "then \`podman container restore --import\` runs while ckstream places the diff and the CRIU images into the new container."
		echo
		SR=$(med "$fs" ck-cka-none seqread wall)
		[[ -n $SR ]] && echo "One sequential read of the uncompressed .cka with caches dropped (\`cat X.cka > /dev/null\`): $(f 2 "$SR") s." && echo
		PZ=$(med "$fs" podman-zstd checkpoint archive_bytes)
		line="Sizes: podman none $(nb "$P_AB") B; podman zstd $(nb "$PZ") B"
		for cs in "${CASE_LIST[@]}"; do
			[[ $cs == ck-*zstd* ]] || continue
			ab=$(med "$fs" "$cs" checkpoint archive_bytes)
			[[ -n $ab ]] && line+="; $cs $(nb "$ab") B ($(div "$ab" "$PZ" 3) × podman zstd)"
		done
		echo "$line."
	done
	echo
	echo "Targets (issue 4): checkpoint ≥ 25× faster than podman uncompressed (≤ 1.5 s for the diff part), restore of the diff ≥ 15× faster,"
	echo "zstd archives no larger than podman's. Per-run data: $(basename "$TSV"); command logs: $(basename "$LOGD")/."
} | tee "$REPORT"
}

# ------------------------------------------------------------------ main
read -ra CASE_LIST <<<"$CASES"
read -ra FS_LIST <<<"$FSES"
if [[ -n ${SUMMARY_FROM:-} ]]; then
	# Regenerate the report of an earlier (possibly interrupted) run from its TSV.
	cp "$SUMMARY_FROM.header" "$TSV.header" 2>/dev/null || echo "(header of the original run not found)" >"$TSV.header"
	cp "$SUMMARY_FROM" "$TSV"
	FS_DONE=()
	for fs in "${FS_LIST[@]}"; do grep -q "^$fs	" "$TSV" && FS_DONE+=("$fs"); done
	LOAD_END="(summary regenerated from $(basename "$SUMMARY_FROM"))"
	rmdir "$LOGD" 2>/dev/null || true
	write_summary
	log "report: $REPORT"
	exit 0
fi
N=${#CASE_LIST[@]}
T_START=$(now)
FS_DONE=()
for fs in "${FS_LIST[@]}"; do
	setup_fs "$fs"
	for ((rep = 1; rep <= REPS; rep++)); do
		for ((k = 0; k < N; k++)); do
			run_case "$fs" "$rep" "${CASE_LIST[$(((k + rep - 1) % N))]}" # order rotates each rep
		done
	done
	teardown_fs
	FS_DONE+=("$fs")
	LOAD_END="$(loadavg) (after $fs)"
	write_summary >/dev/null
	log "interim report after $fs: $REPORT"
done
LOAD_END=$(loadavg)
log "load average at end: $LOAD_END; total $(fsub "$(now)" "$T_START") s"
write_summary
log "report: $REPORT"

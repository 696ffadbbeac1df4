#!/usr/bin/env bash
# mount-bench.sh — what a lazy `ckstream mount` costs against reading the archive other ways.
#
# Dataset: pack-bench.sh's ($CACHE/dataset: a CRIU dump of a ~1.6 GiB memtest tree plus a
# ~0.9 GiB rootfs-like tree of ~51k files) when it exists; otherwise a generated one
# ($CACHE/mount-dataset: the same rootfs-like copy plus a 1 GiB "pages" file, half
# random, half text). One zstd:1 archive of it, and a tar | zstd -1 -T0 of the same tree.
#
# Side by side in one run, page cache dropped before every step (cold reads), REPS runs,
# medians:
#   A. one ~1 MiB file: through the mount (mount start + read) | ckstream cat |
#      ckstream unpack of the whole archive | tar -x of that one member from the tar.zst:
#      wall time and bytes read from the archive (rchar of the reading processes).
#   B. sequential read of the largest file: through the mount (read-ahead on / off)
#      vs ckstream cat: wall time and MB/s.
# Markdown report on stdout and in bench/out/mount-bench-<date>.md.
#
# Env: REPS (3) CACHE (/var/tmp/ckstream-bench) NO_BUILD=1 CKSTREAM (binary path)
#      ROOTFS_SRC (dirs copied into a generated dataset)

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPS=${REPS:-3}
CACHE=${CACHE:-/var/tmp/ckstream-bench}
ROOTFS_SRC=${ROOTFS_SRC:-"/usr/share /usr/lib/python3 /usr/lib/python3.11 /usr/lib/gcc /usr/lib/git-core /usr/lib/systemd"}

WORK="" MP=""
unmount_mp() {
	if [[ -n $MP ]] && grep -qF " $MP " /proc/self/mountinfo; then
		umount "$MP" 2>/dev/null || umount -l "$MP"
	fi
}
# shellcheck disable=SC2016 # expanded at exit
on_exit '[[ -n $WORK ]] && rm -rf "$WORK"'
on_exit unmount_mp

rchar() { awk '/^rchar:/ {print $2}' "/proc/$1/io"; }
HZ=$(getconf CLK_TCK)
cputicks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime of a live process

[[ $(id -u) == 0 ]] || die "must run as root (FUSE mount, drop_caches)"
need_tools zstd tar jq getfattr
need_ckstream
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/mount-work.XXXXXX")
MP=$WORK/mnt
mkdir -p "$MP"

# ---------------------------------------------------------------- dataset
if [[ -d $CACHE/dataset && -s $CACHE/dataset.info ]]; then
	DATASET=$CACHE/dataset
	log "dataset: reusing pack-bench's $DATASET"
else
	DATASET=$CACHE/mount-dataset
	if [[ ! -f $DATASET/.complete ]]; then
		log "dataset: generating $DATASET"
		rm -rf "$DATASET"; mkdir -p "$DATASET/rootfs" "$DATASET/criu"
		# shellcheck disable=SC2086 # a list of directories
		copy_dirs "$DATASET/rootfs" $ROOTFS_SRC
		{
			head -c 512M /dev/urandom
			find "$DATASET/rootfs" -type f -print0 | xargs -0 cat | head -c 512M
		} >"$DATASET/criu/pages-1.img"
		touch "$DATASET/.complete"
	fi
fi
DS_BYTES=$(tree_bytes "$DATASET")
DS_FILES=$(find "$DATASET" -type f | wc -l)

# The ~1 MiB file: the first (by name) regular file of the rootfs between 0.9 and 1.2 MiB.
ONE_REL=$(cd "$DATASET" && find rootfs -type f -size +900k -size -1229k -printf '%p\n' | LC_ALL=C sort | head -1)
[[ -n $ONE_REL ]] || die "no ~1 MiB file in $DATASET/rootfs"
ONE_SIZE=$(stat -c %s "$DATASET/$ONE_REL")
BIG_REL=$(cd "$DATASET" && find . -type f -printf '%s %P\n' | sort -n | tail -1 | cut -d' ' -f2-)
BIG_SIZE=$(stat -c %s "$DATASET/$BIG_REL")
log "one file: $ONE_REL ($ONE_SIZE B); large file: $BIG_REL ($BIG_SIZE B)"

ARCHIVE=$WORK/a.cka
TARZST=$WORK/a.tar.zst
log "packing $DATASET ($DS_FILES files, $DS_BYTES B) with zstd:1"
"$CKSTREAM" pack -q -c zstd:1 -o "$ARCHIVE" .="$DATASET"
log "tar | zstd -1 -T0 of the same tree"
tar -C "$DATASET" -cf - . | zstd -1 -T0 -q -c >"$TARZST"
ARCHIVE_BYTES=$(stat -c %s "$ARCHIVE")
TAR_BYTES=$(stat -c %s "$TARZST")
INDEX_BYTES=$("$CKSTREAM" info --json "$ARCHIVE" | jq '.index_bytes // empty')
cmp -s <("$CKSTREAM" cat "$ARCHIVE" "$ONE_REL") "$DATASET/$ONE_REL" || die "ckstream cat gives other bytes"

RES=$WORK/results.tsv
printf 'step\tmetric\tvalue\n' >"$RES"
# record STEP METRIC VALUE
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RES"; }

# measure STEP CMD...: cold cache, wall seconds and rchar of CMD and its children.
measure() {
	local step=$1; shift
	drop_caches
	local out
	out=$(bash -c 'a=$(awk "/^rchar:/ {print \$2}" /proc/$$/io); t0=$(date +%s.%N)
		c0=$(awk "{print \$16 + \$17}" /proc/$$/stat)
		"$@" >/dev/null
		t1=$(date +%s.%N); b=$(awk "/^rchar:/ {print \$2}" /proc/$$/io)
		c1=$(awk "{print \$16 + \$17}" /proc/$$/stat)
		echo "$(awk -v a="$t1" -v b="$t0" "BEGIN {printf \"%.6f\", a - b}") $((b - a)) $((c1 - c0))"' measure "$@")
	read -r secs bytes ticks <<<"$out"
	record "$step" secs "$secs"
	record "$step" bytes "$bytes"
	record "$step" cpu "$(awk -v t="$ticks" -v hz="$HZ" 'BEGIN {printf "%.2f", t / hz}')"
}

# mount_and MODE STEP FILE [mount args...]: cold cache, mount in the background, then
# read FILE through it; records mount time, read time, bytes the server read for each.
mount_and_read() {
	local step=$1 file=$2; shift 2
	drop_caches
	local t0 t1 t2 pid r1 r2 c1 c2 ct
	t0=$(now)
	pid=$("$CKSTREAM" mount --background "$@" "$ARCHIVE" "$MP" 2>&1 | sed -n 's/.*(pid \([0-9]*\)).*/\1/p')
	t1=$(now)
	[[ -n $pid ]] || die "mount did not start"
	r1=$(rchar "$pid")
	c1=$(cputicks "$pid")
	# The reader's own CPU (copying out of the page cache) counts too.
	ct=$(bash -c 'cat "$1" >/dev/null; awk "{print \$16 + \$17}" /proc/$$/stat' c "$MP/$file")
	t2=$(now)
	r2=$(rchar "$pid")
	c2=$(cputicks "$pid")
	local fetched
	fetched=$(getfattr --absolute-names --only-values -n user.ckstream.stats "$MP" | jq .fetched_bytes)
	umount "$MP"
	while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
	record "$step" mount_secs "$(fsub "$t1" "$t0")"
	record "$step" read_secs "$(fsub "$t2" "$t1")"
	record "$step" secs "$(fsub "$t2" "$t0")"
	record "$step" mount_bytes "$r1"
	record "$step" read_bytes "$((r2 - r1))"
	record "$step" bytes "$r2"
	record "$step" fetched "$fetched"
	record "$step" cpu "$(awk -v t="$((c2 - c1 + ct))" -v hz="$HZ" 'BEGIN {printf "%.2f", t / hz}')"
}

# zstd alone reads the archive; tar reads zstd's output through a pipe.
tar_one() {
	bash -c 'zstd -dc -q "$1"; awk "/^rchar:/ {print \$2}" /proc/$$/io >"$2"' z "$TARZST" "$WORK/zstd.rchar" |
		tar -C "$WORK/tarout" -xf - "./$ONE_REL"
}

for ((rep = 1; rep <= REPS; rep++)); do
	log "rep $rep/$REPS: one file through the mount"
	mount_and_read one_mount "$ONE_REL"
	log "rep $rep/$REPS: ckstream cat"
	measure one_cat "$CKSTREAM" cat "$ARCHIVE" "$ONE_REL"
	log "rep $rep/$REPS: ckstream unpack (whole archive)"
	rm -rf "$WORK/unpacked"
	measure one_unpack "$CKSTREAM" unpack -q "$ARCHIVE" -C "$WORK/unpacked"
	cmp -s "$WORK/unpacked/$ONE_REL" "$DATASET/$ONE_REL" || die "unpack gives other bytes"
	rm -rf "$WORK/unpacked"
	log "rep $rep/$REPS: tar -x of one member"
	rm -rf "$WORK/tarout"; mkdir -p "$WORK/tarout"
	drop_caches
	t0=$(now); tar_one; t1=$(now)
	record one_tar secs "$(fsub "$t1" "$t0")"
	record one_tar bytes "$(cat "$WORK/zstd.rchar")"
	cmp -s "$WORK/tarout/$ONE_REL" "$DATASET/$ONE_REL" || die "tar gives other bytes"
	rm -rf "$WORK/tarout"

	log "rep $rep/$REPS: sequential read of $BIG_REL"
	mount_and_read big_mount "$BIG_REL"
	mount_and_read big_mount_nora "$BIG_REL" --readahead 0
	measure big_cat "$CKSTREAM" cat "$ARCHIVE" "$BIG_REL"
done

med() { tsv_med "$RES" value step="$1" metric="$2"; }
fmt_s() { printf '%.3f' "$1"; }
mib() { awk -v b="$1" 'BEGIN {printf "%.2f MiB", b / 1048576}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.1f", a / b; else print "-"}'; }

OM=$(med one_mount secs) OMM=$(med one_mount mount_secs) OMR=$(med one_mount read_secs)
OMB=$(med one_mount bytes) OMMB=$(med one_mount mount_bytes) OMRB=$(med one_mount read_bytes) OMF=$(med one_mount fetched)
OC=$(med one_cat secs) OCB=$(med one_cat bytes)
OU=$(med one_unpack secs) OUB=$(med one_unpack bytes)
OT=$(med one_tar secs) OTB=$(med one_tar bytes)
BM=$(med big_mount read_secs) BN=$(med big_mount_nora read_secs) BC=$(med big_cat secs)
BMC=$(med big_mount cpu) BNC=$(med big_mount_nora cpu) BCC=$(med big_cat cpu)
OUC=$(med one_unpack cpu)

{
	echo "# mount-bench $STAMP (ckstream $CK_REV)"
	echo
	echo "Dataset \`$DATASET\`: $DS_FILES files, $(mib "$DS_BYTES"). Archive (zstd:1, 1 shard): $ARCHIVE_BYTES B (index $INDEX_BYTES B); tar | zstd -1 -T0: $TAR_BYTES B."
	echo "Page cache dropped before every step. Medians of $REPS runs. Bytes = rchar of the processes that read the archive."
	echo "Machine: $(nproc) cores, load before: $(cut -d' ' -f1-3 /proc/loadavg)."
	echo
	echo "## A. One file: \`$ONE_REL\` ($ONE_SIZE B)"
	echo
	echo "| way | wall s | bytes read from the archive | bytes vs mount | time vs mount |"
	echo "|---|---|---|---|---|"
	echo "| \`ckstream mount\` (start $(fmt_s "$OMM") s + read $(fmt_s "$OMR") s) | $(fmt_s "$OM") | $OMB ($(mib "$OMB"): open $OMMB + read $OMRB; chunk payloads $OMF) | 1 | 1 |"
	echo "| \`ckstream cat\` | $(fmt_s "$OC") | $OCB ($(mib "$OCB")) | $(ratio "$OCB" "$OMB") | $(ratio "$OC" "$OM") |"
	echo "| \`ckstream unpack\` (whole archive; CPU $OUC s) | $(fmt_s "$OU") | $OUB ($(mib "$OUB")) | $(ratio "$OUB" "$OMB") | $(ratio "$OU" "$OM") |"
	echo "| \`zstd -dc \| tar -x\` one member | $(fmt_s "$OT") | $OTB ($(mib "$OTB")) | $(ratio "$OTB" "$OMB") | $(ratio "$OT" "$OM") |"
	echo
	echo "## B. Sequential read: \`$BIG_REL\` ($BIG_SIZE B)"
	echo
	echo "| way | wall s | MB/s | vs ckstream cat | CPU s (server + reader) |"
	echo "|---|---|---|---|---|"
	echo "| \`cat\` through the mount (read-ahead 4 chunks) | $(fmt_s "$BM") | $(mb_s "$BIG_SIZE" "$BM") | $(ratio "$BC" "$BM") | $BMC |"
	echo "| \`cat\` through the mount, \`--readahead 0\` | $(fmt_s "$BN") | $(mb_s "$BIG_SIZE" "$BN") | $(ratio "$BC" "$BN") | $BNC |"
	echo "| \`ckstream cat\` | $(fmt_s "$BC") | $(mb_s "$BIG_SIZE" "$BC") | 1 | $BCC |"
	echo
	echo "(\"vs\" columns: how many times more bytes / time the other way takes than the mount; for B, throughput relative to \`ckstream cat\`, >1 is faster.) Mount wall time for B excludes the mount start."
} | tee "$REPORT"
log "report: $REPORT"

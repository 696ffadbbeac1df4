#!/usr/bin/env bash
# pack-bench.sh — ckstream vs tar (+zstd) on XFS (reflink=1) and btrfs loopbacks.
#
# Dataset (built once, cached under $CACHE/dataset, reused if complete):
#   criu/    `criu dump` image dir of a memtest tree (MEMTEST_FILL=mixed, ~1.5 GiB)
#   rootfs/  copy of parts of /usr/share and /usr/lib (~1 GiB, ~50k small files)
# For each fs: loop image (sparse, ~5x dataset) -> mkfs -> mount -> cp -a dataset -> sync,
# then REPS runs of each timed step (caches dropped before each step if possible,
# else a warm-up read of everything). Every step's timing also includes a `sync`
# afterwards ("wall+sync"); "wall" is until the command itself returned.
# Medians -> markdown table on stdout and in bench/out/pack-bench-<date>.md.
#
# Env: REPS (3) CACHE (/var/tmp/ckstream-bench) FSLIST ("xfs btrfs") MEM_MIB (1280,
#      plus 2 children of MEM_MIB/8) ROOTFS_SRC (list of dirs) IMG_FACTOR (5)
#      NO_BUILD=1 (skip cargo build) CKSTREAM (binary path)
#      BIGFILE_GIB=N: the dataset is instead one N GiB file of random bytes (the
#      reflink case: one large CRIU page image or disk image)
#      CODECS ("zstd-1 none"): which of the two step pairs to run

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPS=${REPS:-3}
CACHE=${CACHE:-/var/tmp/ckstream-bench}
BIGFILE_GIB=${BIGFILE_GIB:-}
DATASET=$CACHE/dataset${BIGFILE_GIB:+-bigfile-$BIGFILE_GIB}
CODECS=${CODECS:-"zstd-1 none"}
DS_INFO=$CACHE/dataset${BIGFILE_GIB:+-bigfile-$BIGFILE_GIB}.info
FSLIST=${FSLIST:-"xfs btrfs"}
MEM_MIB=${MEM_MIB:-1280}
ROOTFS_SRC=${ROOTFS_SRC:-"/usr/share /usr/lib/python3 /usr/lib/python3.11 /usr/lib/gcc /usr/lib/git-core /usr/lib/postgresql /usr/lib/node_modules /usr/lib/systemd"}
IMG_FACTOR=${IMG_FACTOR:-5}
CRIU=${CRIU:-/usr/local/sbin/criu}
TIME=/usr/bin/time

MOUNTS=() LOOPS=() IMAGES=() WORK=""
teardown_loops() {
	local m l i
	for m in "${MOUNTS[@]}"; do umount "$m" 2>/dev/null || umount -l "$m"; rmdir "$m" 2>/dev/null; done
	for l in "${LOOPS[@]}"; do losetup -d "$l"; done
	for i in "${IMAGES[@]}"; do rm -f "$i"; done
}
# shellcheck disable=SC2016 # expanded at exit
on_exit 'rm -rf "$DATASET.tmp" "$WORK"'
on_exit teardown_loops
on_exit kill_memtest

[[ $(id -u) == 0 ]] || die "must run as root (mount, losetup, criu)"
need_tools "$CRIU" mkfs.xfs mkfs.btrfs zstd tar gcc jq "$TIME"
need_ckstream
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/work.XXXXXX")

# ---------------------------------------------------------------- dataset
build_dataset() {
	local tmp=$DATASET.tmp hb=$CACHE/memtest-hb
	rm -rf "$tmp"; mkdir -p "$tmp/criu" "$tmp/rootfs"
	log "dataset: copying rootfs-like tree from: $ROOTFS_SRC"
	# shellcheck disable=SC2086 # a list of directories
	copy_dirs "$tmp/rootfs" $ROOTFS_SRC
	log "dataset: building memtest, starting it with ${MEM_MIB} MiB (+2 children), MEMTEST_FILL=mixed"
	build_memtest "$CACHE"
	MEMTEST_FILL=mixed start_memtest "$MEM_MIB" "$hb" 2
	log "dataset: criu dump -t $MT_PID"
	"$CRIU" dump -t "$MT_PID" -D "$tmp/criu" -o dump.log ||
		die "criu dump failed, see $tmp/criu/dump.log"
	mv "$tmp/criu/dump.log" "$CACHE/criu-dump.log"
	MT_PID=""
	rm -f "$hb" "$hb".*
	log "dataset: measuring compressibility (tar | zstd -1)"
	local part z
	{
		for part in criu rootfs; do
			z=$(tar -C "$tmp/$part" -cf - . | zstd -1 -T0 -q -c | wc -c)
			printf '%s bytes=%s files=%s dirs=%s symlinks=%s zstd1_bytes=%s\n' "$part" \
				"$(tree_bytes "$tmp/$part")" "$(find "$tmp/$part" -type f | wc -l)" \
				"$(find "$tmp/$part" -type d | wc -l)" "$(find "$tmp/$part" -type l | wc -l)" "$z"
		done
	} >"$tmp.info"
	mv "$tmp.info" "$DS_INFO"
	mv "$tmp" "$DATASET"
}
build_bigfile() {
	local tmp=$DATASET.tmp
	rm -rf "$tmp"; mkdir -p "$tmp"
	log "dataset: one ${BIGFILE_GIB} GiB file of random bytes"
	head -c $((BIGFILE_GIB << 30)) /dev/urandom >"$tmp/big"
	# random bytes: zstd stores them (ratio 1.00), not measured
	echo "big bytes=$((BIGFILE_GIB << 30)) files=1 dirs=1 symlinks=0 zstd1_bytes=$((BIGFILE_GIB << 30))" >"$tmp.info"
	mv "$tmp.info" "$DS_INFO"
	mv "$tmp" "$DATASET"
}
if [[ -n $BIGFILE_GIB ]]; then
	[[ -d $DATASET && -s $DS_INFO ]] || { rm -rf "$DATASET"; build_bigfile; }
elif [[ ! -d $DATASET || ! -s $DS_INFO ]]; then
	rm -rf "$DATASET"
	build_dataset
else
	log "dataset: reusing $DATASET"
fi
DS_BYTES=$(tree_bytes "$DATASET")
DS_FILES=$(find "$DATASET" -type f | wc -l)
DS_ALL=$(find "$DATASET" -mindepth 1 | wc -l)
DS_DU=$(du -sb "$DATASET" | cut -f1)

# ---------------------------------------------------------------- cache policy
# CACHE_MODE=warm forces warm reads even where caches could be dropped (the usual case
# right after CRIU wrote its images or a container wrote its files).
if [[ ${CACHE_MODE:-auto} != warm ]] && (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
	CACHE_MODE=drop
	CACHE_NOTE="page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every timed step: cold reads"
else
	CACHE_MODE=warm
	CACHE_NOTE="warm caches: full warm-up read of inputs before every timed step, for every tool"
fi
log "$CACHE_NOTE"

RES=$WORK/results.tsv
: >"$RES"

# prep INPUT...: make caches equal before a timed step.
prep() {
	if [[ $CACHE_MODE == drop ]]; then
		drop_caches
	else
		sync
		tar -P -cf - "$@" | cat >/dev/null
	fi
}

# timed FS OP TOOL REP OUTPATH MNT CMD: run CMD (bash -c), then sync; record a row.
timed() {
	local fs=$1 op=$2 tool=$3 rep=$4 out=$5 mnt=$6 cmd=$7
	local tf=$WORK/time.out jf=$WORK/json.out u0 t0 t1 t2 cpu size cloned
	u0=$(used_bytes "$mnt")
	: >"$jf"
	t0=$(now)
	JF=$jf $TIME -f '%U %S' -o "$tf" bash -c "$cmd" || die "failed: $cmd"
	t1=$(now)
	sync
	t2=$(now)
	cpu=$(awk 'END {printf "%.2f", $1 + $2}' "$tf")
	if [[ -d $out ]]; then size=$(tree_bytes "$out"); else size=$(stat -c %s "$out"); fi
	cloned=$(jq -r '.cloned_bytes // empty' "$jf" 2>/dev/null || true)
	printf '%s\t%s\t%s\t%s\t%.3f\t%.3f\t%s\t%s\t%s\t%s\n' "$fs" "$op" "$tool" "$rep" \
		"$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t0" | bc)" "$cpu" "$size" \
		"$(($(used_bytes "$mnt") - u0))" "${cloned:--}" >>"$RES"
	log "  $fs $op $tool rep$rep: wall $(echo "$t1 - $t0" | bc | cut -c1-6)s +sync $(echo "$t2 - $t0" | bc | cut -c1-6)s cpu ${cpu}s"
}

# correctness: ckstream verify + content diff + metadata manifest compare.
check() {
	local cka=$1 out=$2 data=$3 a=$WORK/m.data b=$WORK/m.out
	"$CKSTREAM" -q verify "$cka" || die "ckstream verify failed: $cka"
	diff -r --no-dereference -q "$data" "$out" >/dev/null || die "diff -r: $out differs from $data"
	local fmt='%y %m %U:%G %s %T@ %p -> %l\n'   # (directory sizes are fs-specific: blanked below)
	(cd "$data" && find . -mindepth 1 -printf "$fmt" | awk '$1 == "d" {$4 = "-"} 1' | sort) >"$a"
	(cd "$out" && find . -mindepth 1 -printf "$fmt" | awk '$1 == "d" {$4 = "-"} 1' | sort) >"$b"
	local root
	root="root dir mode/mtime $(stat -c '%a %Y' "$data") vs $(stat -c '%a %Y' "$out")"
	if cmp -s "$a" "$b"; then
		CHECKS+=("$cka: verify ok, diff -r identical, metadata of all $(wc -l <"$a") entries (type/mode/owner/size/link/mtime ns) identical; $root")
	else
		local nd ex
		nd=$(diff "$a" "$b" | grep -c '^<' || true)
		ex=$(diff "$a" "$b" | grep -m2 '^[<>]' | tr '\n' ' ' || true)
		cp "$a" "$OUTDIR/manifest-$STAMP-data.txt"; cp "$b" "$OUTDIR/manifest-$STAMP-$(basename "$cka").txt"
		CHECKS+=("$cka: verify ok, diff -r identical, METADATA DIFFERS in $nd entries (manifests kept in bench/out), e.g. \`$ex\`")
	fi
	log "  check: ${CHECKS[-1]}"
}
CHECKS=()

# ---------------------------------------------------------------- per filesystem
bench_fs() {
	local fs=$1 loop size
	local img=$CACHE/$fs.img mnt=$CACHE/mnt-$fs
	size=$(((DS_DU * IMG_FACTOR / 1048576 + 1024) * 1048576))
	log "[$fs] loop image $img ($((size >> 20)) MiB sparse)"
	rm -f "$img"; truncate -s "$size" "$img"; IMAGES+=("$img")
	loop=$(losetup --find --show --direct-io=on "$img" 2>/dev/null || losetup --find --show "$img")
	LOOPS+=("$loop")
	case $fs in
	xfs) mkfs.xfs -q -f -m reflink=1 "$loop" ;;
	btrfs) mkfs.btrfs -q -f "$loop" >/dev/null ;;
	esac
	mkdir -p "$mnt"; mount "$loop" "$mnt"; MOUNTS+=("$mnt")
	log "[$fs] cp -a dataset"
	cp -a "$DATASET" "$mnt/data"; sync
	local D=$mnt/data A=$mnt/arch O=$mnt/out r
	mkdir -p "$A"
	local zstd=false none=false
	[[ " $CODECS " == *" zstd-1 "* ]] && zstd=true
	[[ " $CODECS " == *" none "* ]] && none=true
	for ((r = 1; r <= REPS; r++)); do
		# What reading the input alone takes: the disk's speed with cold caches.
		prep "$D"
		timed "$fs" "read input (reference)" "cat" "$r" "$D" "$mnt" "find '$D' -type f -print0 | xargs -0 cat >/dev/null"
		if $zstd; then
			rm -f "$A/x.tar.zst"; prep "$D"
			timed "$fs" "pack zstd-1" "tar + zstd -1 -T0" "$r" "$A/x.tar.zst" "$mnt" "tar -C '$D' -cf - . | zstd -1 -T0 -q -o '$A/x.tar.zst'"
			rm -f "$A/x.cka"; prep "$D"
			timed "$fs" "pack zstd-1" "ckstream" "$r" "$A/x.cka" "$mnt" "'$CKSTREAM' pack -q --json -c zstd:1 -o '$A/x.cka' .='$D' >\$JF"
		fi
		if $none; then
			rm -f "$A/x.tar"; prep "$D"
			timed "$fs" "pack none" "tar" "$r" "$A/x.tar" "$mnt" "tar -C '$D' -cf '$A/x.tar' ."
			rm -f "$A/n.cka"; prep "$D"
			timed "$fs" "pack none" "ckstream" "$r" "$A/n.cka" "$mnt" "'$CKSTREAM' pack -q --json -c none -o '$A/n.cka' .='$D' >\$JF"
		fi
	done
	for ((r = 1; r <= REPS; r++)); do
		if $zstd; then
			rm -rf "$O"; mkdir "$O"; prep "$A/x.tar.zst"
			timed "$fs" "unpack zstd-1" "zstd -dc + tar -x" "$r" "$O" "$mnt" "zstd -dc '$A/x.tar.zst' | tar -C '$O' -xf -"
			rm -rf "$O"; prep "$A/x.cka"
			timed "$fs" "unpack zstd-1" "ckstream" "$r" "$O" "$mnt" "'$CKSTREAM' unpack -q --json '$A/x.cka' -C '$O' >\$JF"
			((r == 1)) && check "$A/x.cka" "$O" "$D"
		fi
		if $none; then
			rm -rf "$O"; mkdir "$O"; prep "$A/x.tar"
			timed "$fs" "unpack none" "tar" "$r" "$O" "$mnt" "tar -C '$O' -xf '$A/x.tar'"
			rm -rf "$O"; prep "$A/n.cka"
			timed "$fs" "unpack none" "ckstream" "$r" "$O" "$mnt" "'$CKSTREAM' unpack -q --json '$A/n.cka' -C '$O' >\$JF"
			((r == 1)) && check "$A/n.cka" "$O" "$D"
		fi
	done
	rm -rf "$O"
	umount "$mnt"; rmdir "$mnt"; MOUNTS=()
	losetup -d "$loop"; LOOPS=()
	rm -f "$img"; IMAGES=()
}

T_START=$(now)
LOAD_START=$(loadavg)
for fs in $FSLIST; do bench_fs "$fs"; done
T_TOTAL=$(echo "$(now) - $T_START" | bc | cut -d. -f1)

# ---------------------------------------------------------------- report
table() {
	awk -F'\t' -v dsb="$DS_BYTES" '
	'"$AWK_MEDIAN"'
	{
		key = $1 SUBSEP $2 SUBSEP $3
		if (!(key in seen)) { seen[key] = 1; order[++nk] = key }
		for (c = 5; c <= 9; c++) vals[key, c] = vals[key, c] " " $c
		cl[key] = $10
	}
	END {
		print "| fs | operation | tool | wall s | wall+sync s | CPU s | output bytes | ratio | fs used Δ bytes | ckstream cloned bytes | speedup (wall+sync) | speedup (wall) |"
		print "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
		for (k = 1; k <= nk; k++) {
			key = order[k]; split(key, p, SUBSEP)
			w[key] = median(vals[key, 5]); ws[key] = median(vals[key, 6])
			peer[p[1] SUBSEP p[2]] = (p[3] == "ckstream") ? peer[p[1] SUBSEP p[2]] : key
		}
		for (k = 1; k <= nk; k++) {
			key = order[k]; split(key, p, SUBSEP)
			out = median(vals[key, 8]); sp = "—"; sp2 = "—"
			if (p[3] == "ckstream") {
				pk = peer[p[1] SUBSEP p[2]]
				sp = sprintf("%.2f×", ws[pk] / ws[key]); sp2 = sprintf("%.2f×", w[pk] / w[key])
			}
			printf "| %s | %s | %s | %.2f | %.2f | %.2f | %.0f | %.2f | %.0f | %s | %s | %s |\n", p[1], p[2], p[3],
				w[key], ws[key], median(vals[key, 7]), out, dsb / out, median(vals[key, 9]), cl[key], sp, sp2
		}
	}' "$RES"
}

{
	echo "# ckstream pack-bench $STAMP"
	echo
	echo "- host: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, kernel $(uname -r); ckstream $("$CKSTREAM" --version | awk '{print $2}') (built at $CK_REV)"
	echo "- dataset: $DATASET — $DS_BYTES bytes ($(echo "scale=2; $DS_BYTES / 1073741824" | bc) GiB) in $DS_FILES regular files ($DS_ALL entries incl. dirs/symlinks)"
	awk '{ split($2, b, "="); split($6, z, "="); printf "  - %s: %s, %s, %s, %s; tar|zstd -1 ratio %.2f\n", $1, $2, $3, $4, $5, b[2] / z[2] }' "$DS_INFO"
	echo "- caches: $CACHE_NOTE"
	echo "- REPS=$REPS, medians shown; loop images sparse ${IMG_FACTOR}x dataset on $(df --output=fstype /var/tmp | tail -1), losetup direct-io where supported"
	echo "- wall = until the command returned; wall+sync = plus a following \`sync\` (all steps, readers and writers); CPU = user+sys of the command tree (/usr/bin/time)"
	echo "- ratio = dataset bytes / output bytes (unpack: apparent bytes of the extracted tree); fs used Δ = df used after sync minus before"
	echo "- speedup = peer median wall / ckstream median wall"
	echo "- total benchmark time (excluding dataset build): ${T_TOTAL}s; loadavg at start $LOAD_START, at end $(loadavg)"
	echo
	table
	echo
	echo "Correctness:"
	for c in "${CHECKS[@]}"; do echo "- $c"; done
	echo
	echo "<details><summary>raw runs (fs, op, tool, rep, wall, wall+sync, cpu, out bytes, used Δ, cloned)</summary>"
	echo
	echo '```'
	cat "$RES"
	echo '```'
	echo "</details>"
} | tee "$REPORT"
log "report written to $REPORT"

#!/usr/bin/env bash
# criu-bench.sh — live checkpoint/restore of one memtest process:
#   plain   `criu dump -t PID -D /dev/shm/X` + `criu restore -D /dev/shm/X -d`
#   none    `ckstream dump -c none`   -> /dev/shm/X.cka, `ckstream restore`
#   zstd    `ckstream dump -c zstd:1` -> /dev/shm/X.cka, `ckstream restore`
#   lz4     `ckstream dump -c lz4`    -> /dev/shm/X.cka, `ckstream restore`
# side by side in one run. The SAME memtest process (MIB MiB, incompressible by
# default) is dumped and restored over and over; the mode order rotates each rep.
# After every restore memtest re-checks its whole buffer (SIGUSR1 -> hb.verify
# must say verify=ok) and its heartbeat must advance; anything else aborts.
#
# Measurements per step:
#   wall        date +%s.%N around the command (criu, or ckstream which runs criu)
#   criu CPU    plain: /usr/bin/time -f '%U %S %M'; ckstream: JSON rusage.children_*
#   ckstream    JSON rusage.self_cpu_seconds / self_max_rss_kib; dump seconds_since_freeze
#   total CPU   cgroup-v1 cpuacct group holding memtest, the measuring command and
#               everything it forks (criu, the parasite running in the dumped task,
#               the restored task): delta of cpuacct.usage around the step. Includes
#               memtest's 100 ms heartbeat ticks (negligible). Empty if no cpuacct v1.
# criu is run with `-o LOG -v4` in plain mode too, as ckstream does.
# Medians of REPS runs -> markdown table on stdout and bench/out/criu-bench-<date>.md;
# every run is kept in bench/out/criu-bench-<date>.tsv.
#
# Real disk (WHERE contains "disk"; after the tmpfs part, in the same run): the same
# comparison where durability costs something. For each size in MIBS and fill in FILLS a
# fresh memtest is dumped and restored REPS times, images/archives in a directory under
# DISK_DIR (default /var/tmp/ckstream-bench; here / is ext4 on a virtio disk), page cache
# dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every dump, restore and write:
# cold. Steps (order rotates each rep, dd comes last; every restore verified as above,
# and the process left running by a --leave-running dump re-checked the same way):
#   dd          the disk's own limit: the faster of two `dd bs=4M conv=fdatasync` runs into a
#               fresh file of the archive's size (the largest archive/image of this
#               size+fill so far) from a random
#               source pre-generated on $SHM (max MIBS + 64 MiB of RAM) -> seconds, MB/s
#   plain       `criu dump -t PID -D DIR`, then a timed `sync`; `criu restore -D DIR -d`
#   plain-lr    `criu dump --leave-running -t PID -D DIR` (+ timed sync)
#   ck-C        `ckstream dump -c C -o DIR/X.cka` (+ timed sync); `ckstream restore`
#   ck-C-lr     `ckstream dump -c C --leave-running` (+ timed sync)
# Freeze time (how long the application is frozen): plain CRIU: freezing_time +
# frozen_time of the dump entry of CRIU's own stats-dump image in DIR (parsed here, no
# crit); ckstream: JSON freeze_seconds if the binary prints it, else seconds_since_freeze
# (the report says which); the stats-dump CRIU leaves in ckstream's --work-dir is parsed
# too and shown beside it. Ratios per size/fill/codec (medians): ckstream freeze ÷ disk
# limit, disk limit = max(plain dump wall, archive bytes ÷ dd bandwidth) (target ≤ 1.2);
# ckstream freeze ÷ (plain dump wall + its sync) (≤ 0.75); leave-running freeze ÷ plain
# leave-running freeze (≤ 1.05); ckstream restore ÷ plain restore (≤ 1.0). Every disk step
# is kept in bench/out/criu-bench-<date>-disk.tsv; the tables go into the same report.
#
# Env: MIB (2048) REPS (3) MODES ("plain none zstd lz4") MEMTEST_FILL (random)
#      SHM (/dev/shm) NO_BUILD=1 (skip cargo build) CKSTREAM CRIU TIMEOUT (900 s/step)
#      WHERE ("shm disk": either or both) DISK_DIR (/var/tmp/ckstream-bench)
#      MIBS ("1024 4096") FILLS ("random mixed") DISK_CODECS ("none zstd"; ckstream -c,
#      zstd = zstd:1) -- MIB, MODES and MEMTEST_FILL are for tmpfs, MIBS, FILLS and
#      DISK_CODECS for the disk; REPS for both

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIB=${MIB:-2048}
REPS=${REPS:-3}
MODES=${MODES:-"plain none zstd lz4"}
SHM=${SHM:-/dev/shm}
TIMEOUT=${TIMEOUT:-900}
CRIU=${CRIU:-/usr/local/sbin/criu}
export CKSTREAM_CRIU=${CKSTREAM_CRIU:-$CRIU}
TIME=/usr/bin/time
CG_ROOT=/sys/fs/cgroup/cpuacct
WHERE=${WHERE:-"shm disk"}
DISK_DIR=${DISK_DIR:-/var/tmp/ckstream-bench}
MIBS=${MIBS:-"1024 4096"}
FILLS=${FILLS:-"random mixed"}
DISK_CODECS=${DISK_CODECS:-"none zstd"}
for w in $WHERE; do [[ $w == shm || $w == disk ]] || die "WHERE: '$w' is neither shm nor disk"; done
where() { [[ " $WHERE " == *" $1 "* ]]; }

WORK="" CG="" IMG="$SHM/criu-bench.$$" DDIR="" DDSRC=""
remove_cg() {
	[[ -n $CG && -d $CG ]] || return 0
	for _ in $(seq 50); do [[ -s $CG/cgroup.procs ]] || break; sleep 0.1; done
	rmdir "$CG" 2>/dev/null || log "warning: could not remove cgroup $CG"
}
# shellcheck disable=SC2016 # expanded at exit
on_exit 'rm -rf "$IMG" "$IMG.cka" "$WORK" "$DDIR" "$DDSRC"'
on_exit remove_cg
on_exit kill_memtest

# Run "$@" inside the cpuacct cgroup (if any): the wrapper joins, then execs.
in_cg() {
	if [[ -n $CG ]]; then
		bash -c 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"' in_cg "$CG" "$@"
	else
		"$@"
	fi
}
cg_usage() { if [[ -n $CG ]]; then cat "$CG/cpuacct.usage"; else echo 0; fi; }
cg_delta() { [[ -n $CG ]] && awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", (b-a)/1e9}' || echo ""; }

[[ $(id -u) == 0 ]] || die "must run as root (criu)"
need_tools "$CRIU" gcc jq "$TIME" timeout python3 dd
need_ckstream
WORK=$(mktemp -d /tmp/criu-bench.XXXXXX)
LOAD_START=$(loadavg)
log "load average at start: $LOAD_START"

if ! where shm; then
	CPU_METHOD="not measured (tmpfs part not run)"
elif [[ -d $CG_ROOT && -w $CG_ROOT ]] && mkdir "$CG_ROOT/criu-bench.$$" 2>/dev/null; then
	CG=$CG_ROOT/criu-bench.$$
	CPU_METHOD="cgroup v1 cpuacct ($CG, removed afterwards): cpuacct.usage delta around each step"
else
	CPU_METHOD="not measured (no writable cgroup-v1 cpuacct hierarchy)"
	log "warning: total CPU not measurable: $CPU_METHOD"
fi

build_memtest "$WORK"
HB=$WORK/hb

show_fail() { # file...
	local f
	for f in "$@"; do [[ -s $f ]] && { log "--- tail $f"; tail -20 "$f" >&2; }; done
	return 0
}

# ------------------------------------------------------------------ tmpfs
COLS="rep mode dump_wall dump_ck_seconds dump_since_freeze dump_ck_cpu dump_ck_rss_kib dump_criu_cpu dump_criu_rss_kib dump_total_cpu image_bytes archive_bytes restore_wall restore_ck_cpu restore_ck_rss_kib restore_criu_cpu restore_criu_rss_kib restore_total_cpu load1"

run_plain() {
	local rep=$1 d=$WORK/run t0 t1 u0 u1 dw rw dcg rcg
	rm -rf "$IMG" "$d"; mkdir -p "$IMG" "$d"
	u0=$(cg_usage); t0=$(now)
	if ! in_cg timeout "$TIMEOUT" "$TIME" -f '%U %S %M' -o "$d/dump.time" \
		"$CRIU" dump -t "$MT_PID" -D "$IMG" -o dump.log -v4 2>"$d/dump.err"; then
		show_fail "$d/dump.err" "$IMG/dump.log"; die "plain criu dump failed (rep $rep)"
	fi
	t1=$(now); u1=$(cg_usage)
	dw=$(fsub "$t1" "$t0"); dcg=$(cg_delta "$u0" "$u1")
	local img_bytes; img_bytes=$(tree_bytes "$IMG" -name '*.img')
	read -r du ds dm <"$d/dump.time"
	wait_gone
	u0=$(cg_usage); t0=$(now)
	if ! in_cg timeout "$TIMEOUT" "$TIME" -f '%U %S %M' -o "$d/restore.time" \
		"$CRIU" restore -D "$IMG" -o restore.log -v4 -d 2>"$d/restore.err"; then
		show_fail "$d/restore.err" "$IMG/restore.log"; die "plain criu restore failed (rep $rep)"
	fi
	t1=$(now); u1=$(cg_usage)
	rw=$(fsub "$t1" "$t0"); rcg=$(cg_delta "$u0" "$u1")
	read -r ru rs rm_ <"$d/restore.time"
	rm -rf "$IMG"
	verify_restored "plain rep $rep" "$HB"
	printf '%s\n' "$rep" plain "$dw" "" "" "" "" "$(fsub "$du" "-$ds")" "$dm" "$dcg" "$img_bytes" "$img_bytes" \
		"$rw" "" "" "$(fsub "$ru" "-$rs")" "$rm_" "$rcg" "$(cut -d' ' -f1 /proc/loadavg)" | paste -sd'\t' >>"$TSV"
	log "plain rep $rep: dump ${dw}s restore ${rw}s (verify=ok)"
}

run_ck() {
	local rep=$1 mode=$2 c d=$WORK/run t0 t1 u0 u1 dw rw dcg rcg
	case $mode in none) c=none ;; zstd) c=zstd:1 ;; lz4) c=lz4 ;; *) die "bad mode $mode" ;; esac
	rm -rf "$IMG.cka" "$d"; mkdir -p "$d/wd-dump" "$d/wd-restore"
	u0=$(cg_usage); t0=$(now)
	if ! in_cg timeout "$TIMEOUT" "$CKSTREAM" dump --pid "$MT_PID" -o "$IMG.cka" -c "$c" -q --json \
		--work-dir "$d/wd-dump" >"$d/dump.json" 2>"$d/dump.err"; then
		show_fail "$d/dump.err" "$d/wd-dump/dump.log"; die "ckstream dump -c $c failed (rep $rep)"
	fi
	t1=$(now); u1=$(cg_usage)
	dw=$(fsub "$t1" "$t0"); dcg=$(cg_delta "$u0" "$u1")
	wait_gone
	u0=$(cg_usage); t0=$(now)
	if ! in_cg timeout "$TIMEOUT" "$CKSTREAM" restore "$IMG.cka" -q --json \
		--work-dir "$d/wd-restore" >"$d/restore.json" 2>"$d/restore.err"; then
		show_fail "$d/restore.err" "$d/wd-restore/restore.log"; die "ckstream restore ($mode) failed (rep $rep)"
	fi
	t1=$(now); u1=$(cg_usage)
	rw=$(fsub "$t1" "$t0"); rcg=$(cg_delta "$u0" "$u1")
	rm -f "$IMG.cka"
	verify_restored "$mode rep $rep" "$HB"
	local dj rj
	dj=$(jq -r '[.seconds, .seconds_since_freeze, .rusage.self_cpu_seconds, .rusage.self_max_rss_kib,
		.rusage.children_cpu_seconds, .rusage.children_max_rss_kib, .image_bytes, .archive_bytes] | @tsv' "$d/dump.json")
	rj=$(jq -r '[.rusage.self_cpu_seconds, .rusage.self_max_rss_kib,
		.rusage.children_cpu_seconds, .rusage.children_max_rss_kib] | @tsv' "$d/restore.json")
	IFS=$'\t' read -r ds dsf dcpu drss dccpu dcrss ib ab <<<"$dj"
	IFS=$'\t' read -r rcpu rrss rccpu rcrss <<<"$rj"
	printf '%s\n' "$rep" "$mode" "$dw" "$ds" "$dsf" "$dcpu" "$drss" "$dccpu" "$dcrss" "$dcg" "$ib" "$ab" \
		"$rw" "$rcpu" "$rrss" "$rccpu" "$rcrss" "$rcg" "$(cut -d' ' -f1 /proc/loadavg)" | paste -sd'\t' >>"$TSV"
	log "$mode rep $rep: dump ${dw}s (freeze->end ${dsf}s) restore ${rw}s, archive $ab B (verify=ok)"
}

read -ra MODE_LIST <<<"$MODES"
N=${#MODE_LIST[@]}
shm_bench() {
	echo "$COLS" | tr ' ' '\t' >"$TSV"
	log "starting memtest $MIB MiB (MEMTEST_FILL=${MEMTEST_FILL:-random})"
	start_memtest --via in_cg "$MIB" "$HB"
	log "memtest pid $MT_PID ready"
	local rep k m
	for ((rep = 1; rep <= REPS; rep++)); do
		for ((k = 0; k < N; k++)); do
			m=${MODE_LIST[$(((k + rep - 1) % N))]}   # rotate the order each rep
			if [[ $m == plain ]]; then run_plain "$rep"; else run_ck "$rep" "$m"; fi
		done
	done
	kill_memtest
}

# med MODE COLUMN: median over reps (empty if no values)
med() { tsv_med "$TSV" "$2" mode="$1"; }
mib() { [[ -n $1 ]] && awk -v v="$1" 'BEGIN{printf "%.1f", v/1024}' || printf '–'; }
gb() { awk -v v="$1" 'BEGIN{printf "%.4f", v/1e9}'; }

shm_report() {
	local P_DW P_RW N_RW m dw rw ib label
	P_DW=$(med plain dump_wall) P_RW=$(med plain restore_wall)
	N_RW=$(med none restore_wall)
	echo "memtest ${MIB} MiB (MEMTEST_FILL=${MEMTEST_FILL:-random}), same process dumped/restored repeatedly, medians of REPS=$REPS."
	echo "ckstream $CK_REV ($CKSTREAM); criu: $("$CRIU" --version | head -1); kernel $(uname -r); $(nproc) CPUs;"
	echo "fs.pipe-max-size=$(cat /proc/sys/fs/pipe-max-size); images/archives on $SHM (tmpfs). Load average start: $LOAD_START, end: $LOAD_SHM_END."
	echo "GB = 1e9 bytes of CRIU image. Total CPU: $CPU_METHOD."
	echo "verify=ok (full-buffer checksum) and heartbeat advancing after all $((REPS * N)) restores."
	echo
	echo "| mode | dump wall s | restore wall s | dump wall / plain | restore wall / plain | ckstream CPU-s/GB dump | ckstream CPU-s/GB restore | ckstream peak RSS MiB dump / restore | criu CPU s dump / restore | archive bytes |"
	echo "|---|---|---|---|---|---|---|---|---|---|"
	for m in "${MODE_LIST[@]}"; do
		dw=$(med "$m" dump_wall) rw=$(med "$m" restore_wall) ib=$(med "$m" image_bytes)
		if [[ $m == plain ]]; then label="plain criu → $SHM dir"; else label="ckstream -c $m"; [[ $m == zstd ]] && label="ckstream -c zstd:1"; fi
		echo "| $label | $(f 2 "$dw") | $(f 2 "$rw") | $(div "$dw" "$P_DW") | $(div "$rw" "$P_RW") |" \
			"$(div "$(med "$m" dump_ck_cpu)" "$(gb "$ib")" 3) | $(div "$(med "$m" restore_ck_cpu)" "$(gb "$ib")" 3) |" \
			"$(mib "$(med "$m" dump_ck_rss_kib)") / $(mib "$(med "$m" restore_ck_rss_kib)") |" \
			"$(f 2 "$(med "$m" dump_criu_cpu)") / $(f 2 "$(med "$m" restore_criu_cpu)") | $(f 0 "$(med "$m" archive_bytes)") |"
	done
	echo
	echo "zstd:1 restore wall / raw (-c none) restore wall: $(div "$(med zstd restore_wall)" "$N_RW")"
	echo
	echo "| mode | ckstream dump seconds (JSON) | dump seconds_since_freeze | total CPU s dump (cgroup) | total CPU s restore (cgroup) | total CPU-s/GB dump / restore | ckstream CPU s dump / restore | image bytes |"
	echo "|---|---|---|---|---|---|---|---|"
	for m in "${MODE_LIST[@]}"; do
		ib=$(med "$m" image_bytes)
		echo "| $m | $(f 2 "$(med "$m" dump_ck_seconds)") | $(f 2 "$(med "$m" dump_since_freeze)") |" \
			"$(f 2 "$(med "$m" dump_total_cpu)") | $(f 2 "$(med "$m" restore_total_cpu)") |" \
			"$(div "$(med "$m" dump_total_cpu)" "$(gb "$ib")" 3) / $(div "$(med "$m" restore_total_cpu)" "$(gb "$ib")" 3) |" \
			"$(f 3 "$(med "$m" dump_ck_cpu)") / $(f 3 "$(med "$m" restore_ck_cpu)") | $(f 0 "$ib") |"
	done
	echo
	echo "Targets: dump wall ≤ 1.0× plain with ckstream CPU ≤ 0.05 CPU-s/GB; restore wall ≤ 1.0× plain;"
	echo "ckstream restore peak RSS ≤ 64 MiB; zstd restore wall ≤ 1.2× raw. Per-run data: $(basename "$TSV")."
}
# ------------------------------------------------------------------ real disk
DTSV=$OUTDIR/$BENCH-$STAMP-disk.tsv
DCOLS="rep mib fill case op wall freeze freeze_src stats_freeze sync bytes load1"


drow() { printf '%s\n' "$@" "$(cut -d' ' -f1 /proc/loadavg)" | paste -sd'\t' >>"$DTSV"; }

# disk_dump WHAT LOG CMD...: cold cache, run the dump CMD (stdout to $WORK/run/dump.out;
# LOG is shown if it fails), then a `sync`; sets DUMP_WALL and SYNC_WALL.
disk_dump() {
	local what=$1 dlog=$2 d=$WORK/run t0 t1 t2
	shift 2
	drop_caches
	t0=$(now)
	if ! timeout "$TIMEOUT" "$@" >"$d/dump.out" 2>"$d/dump.err"; then
		show_fail "$d/dump.err" "$dlog"; die "$what: dump failed"
	fi
	t1=$(now); sync; t2=$(now)
	DUMP_WALL=$(fsub "$t1" "$t0") SYNC_WALL=$(fsub "$t2" "$t1")
}

# disk_finish REP MIB FILL CASE LR BYTES REMOVE LOG MSG RESTORE...: the rest of a disk
# step after its dump. LR non-empty (--leave-running): re-check the running process.
# Else: cold-cache restore with RESTORE... (timed: a restore row; LOG is shown if it
# fails), then verify. REMOVE (images/archive) is deleted either way; MSG is logged.
disk_finish() {
	local rep=$1 mib=$2 fill=$3 cs=$4 lr=$5 bytes=$6 remove=$7 rlog=$8 msg=$9 d=$WORK/run t0 t1 rw
	shift 9
	local what="disk $cs $mib MiB $fill rep $rep"
	if [[ -n $lr ]]; then
		rm -rf "$remove"
		verify_restored "$what (left running)" "$HB"
		log "$what: $msg (verify=ok)"
		return
	fi
	wait_gone
	drop_caches
	t0=$(now)
	if ! timeout "$TIMEOUT" "$@" >"$d/restore.out" 2>"$d/restore.err"; then
		show_fail "$d/restore.err" "$rlog"; die "$what: restore failed"
	fi
	t1=$(now)
	rw=$(fsub "$t1" "$t0")
	drow "$rep" "$mib" "$fill" "$cs" restore "$rw" "" "" "" "" "$bytes"
	rm -rf "$remove"
	verify_restored "$what" "$HB"
	log "$what: $msg, restore ${rw}s (verify=ok)"
}

# disk_plain REP MIB FILL [lr]: plain CRIU dump to the disk, images in a directory.
disk_plain() {
	local rep=$1 mib=$2 fill=$3 lr=${4:-} cs=plain img=$DDIR/img fr bytes
	[[ -n $lr ]] && cs=plain-lr
	rm -rf "$img" "$WORK/run"; mkdir -p "$img" "$WORK/run"
	disk_dump "disk $cs $mib MiB $fill rep $rep" "$img/dump.log" \
		"$CRIU" dump -t "$MT_PID" -D "$img" -o dump.log -v4 ${lr:+--leave-running}
	fr=$(criu_freeze "$img/stats-dump") || die "$cs: cannot read $img/stats-dump"
	bytes=$(tree_bytes "$img" -name '*.img')
	drow "$rep" "$mib" "$fill" "$cs" dump "$DUMP_WALL" "$fr" stats-dump "$fr" "$SYNC_WALL" "$bytes"
	disk_finish "$rep" "$mib" "$fill" "$cs" "$lr" "$bytes" "$img" "$img/restore.log" \
		"dump ${DUMP_WALL}s (frozen ${fr}s) + sync ${SYNC_WALL}s" \
		"$CRIU" restore -D "$img" -o restore.log -v4 -d
}

# disk_ck REP MIB FILL CODEC [lr]: ckstream dump to an archive on the disk.
disk_ck() {
	local rep=$1 mib=$2 fill=$3 codec=$4 lr=${5:-} c cs arch=$DDIR/x.cka d=$WORK/run fr src sfr bytes
	case $codec in none) c=none ;; zstd) c=zstd:1 ;; lz4) c=lz4 ;; *) c=$codec ;; esac
	cs=ck-$codec${lr:+-lr}
	rm -rf "$arch" "$d"; mkdir -p "$d/wd-dump" "$d/wd-restore"
	disk_dump "disk $cs $mib MiB $fill rep $rep" "$d/wd-dump/dump.log" \
		"$CKSTREAM" dump --pid "$MT_PID" -o "$arch" -c "$c" -q --json ${lr:+--leave-running} --work-dir "$d/wd-dump"
	IFS=$'\t' read -r fr src bytes < <(jq -r 'if .freeze_seconds != null then [.freeze_seconds, "freeze_seconds"]
		else [.seconds_since_freeze, "seconds_since_freeze"] end + [.archive_bytes] | @tsv' "$d/dump.out")
	sfr=""
	[[ -s $d/wd-dump/stats-dump ]] && sfr=$(criu_freeze "$d/wd-dump/stats-dump")
	drow "$rep" "$mib" "$fill" "$cs" dump "$DUMP_WALL" "$fr" "$src" "$sfr" "$SYNC_WALL" "$bytes"
	disk_finish "$rep" "$mib" "$fill" "$cs" "$lr" "$bytes" "$arch" "$d/wd-restore/restore.log" \
		"dump ${DUMP_WALL}s (frozen ${fr}s $src, CRIU stats ${sfr:-?}s) + sync ${SYNC_WALL}s, $bytes B" \
		"$CKSTREAM" restore "$arch" -q --json --work-dir "$d/wd-restore"
}

# disk_dd REP MIB FILL: the disk's write limit for a file of the archive's size: the
# faster of two `dd conv=fdatasync` runs into a fresh file (this virtio disk varies 2-6x
# between back-to-back writes: freed blocks are discarded (ext4 `discard`) and the host
# cache comes and goes; the faster run is the limit a durable checkpoint must respect).
disk_dd() {
	local rep=$1 mib=$2 fill=$3 bytes t0 t1 best="" secs
	bytes=$(awk -F'\t' -v m="$mib" -v f="$fill" 'NR > 1 && $2 == m && $3 == f && $5 == "dump" && $11 > b { b = $11 }
		END { printf "%d\n", b }' "$DTSV")
	((bytes > 0)) || bytes=$((mib * 1048576))
	((bytes <= $(stat -c %s "$DDSRC"))) || die "dd source $DDSRC is smaller than $bytes B"
	for _ in 1 2; do
		rm -f "$DDIR/dd.out"
		drop_caches
		t0=$(now)
		dd if="$DDSRC" of="$DDIR/dd.out" bs=4M count="$bytes" iflag=count_bytes conv=fdatasync status=none
		t1=$(now)
		secs=$(fsub "$t1" "$t0")
		if [[ -z $best ]] || awk -v a="$secs" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$secs; fi
	done
	rm -f "$DDIR/dd.out"
	drow "$rep" "$mib" "$fill" dd write "$best" "" "" "" "" "$bytes"
	log "disk $mib MiB $fill rep $rep dd (faster of 2): $bytes B in ${best}s ($(mb_s "$bytes" "$best") MB/s)"
}

read -ra MIB_LIST <<<"$MIBS"
read -ra FILL_LIST <<<"$FILLS"
read -ra CODEC_LIST <<<"$DISK_CODECS"
disk_bench() {
	echo "$DCOLS" | tr ' ' '\t' >"$DTSV"
	DDIR=$DISK_DIR/criu-bench.$$
	mkdir -p "$DDIR"
	DISK_FS=$(df --output=source,fstype "$DDIR" | tail -1 | tr -s ' ')
	[[ $DISK_FS == *tmpfs* ]] && log "warning: $DDIR is on tmpfs ($DISK_FS), not a real disk"
	local max=0 m
	for m in "${MIB_LIST[@]}"; do ((m > max)) && max=$m; done
	DDSRC=$SHM/criu-bench.$$.ddsrc
	log "dd source: $((max + 64)) MiB from /dev/urandom on $SHM (not timed)"
	head -c "$(((max + 64) * 1048576))" /dev/urandom >"$DDSRC"
	local steps=(plain) c
	for c in "${CODEC_LIST[@]}"; do steps+=("ck-$c"); done
	steps+=(plain-lr)
	for c in "${CODEC_LIST[@]}"; do steps+=("ck-$c-lr"); done
	local n=${#steps[@]} mib fill rep k st
	for mib in "${MIB_LIST[@]}"; do
		for fill in "${FILL_LIST[@]}"; do
			log "disk: starting memtest $mib MiB (MEMTEST_FILL=$fill)"
			MEMTEST_FILL=$fill start_memtest "$mib" "$HB"
			for ((rep = 1; rep <= REPS; rep++)); do
				for ((k = 0; k < n; k++)); do
					st=${steps[$(((k + rep - 1) % n))]}   # rotate the order each rep
					case $st in
					plain) disk_plain "$rep" "$mib" "$fill" ;;
					plain-lr) disk_plain "$rep" "$mib" "$fill" lr ;;
					ck-*-lr) c=${st#ck-}; disk_ck "$rep" "$mib" "$fill" "${c%-lr}" lr ;;
					ck-*) disk_ck "$rep" "$mib" "$fill" "${st#ck-}" ;;
					esac
				done
				disk_dd "$rep" "$mib" "$fill"   # last, to know the archive's size
			done
			kill_memtest
		done
	done
	rm -f "$DDSRC"
}

disk_report() {
	dmed() { tsv_med "$DTSV" "$1" mib="$2" fill="$3" case="$4" op="$5"; }
	local srcs
	srcs=$(awk -F'\t' 'NR > 1 && $4 ~ /^ck-/ && $5 == "dump" { print $8 }' "$DTSV" | sort -u | paste -sd/)
	echo "## Real disk, cold cache"
	echo
	echo "Images/archives in \`$DDIR\` ($DISK_FS, $(findmnt -no OPTIONS -T "$DDIR" | cut -d, -f1-3)); page cache dropped before every dump, restore and dd: cold."
	echo "A fresh memtest per size and fill, dumped/restored REPS=$REPS times per step, step order rotating; medians."
	echo "verify=ok (full-buffer checksum) and heartbeat advancing after every restore and every --leave-running dump."
	echo "Freeze = how long the process was frozen. plain CRIU: freezing_time + frozen_time from its stats-dump image;"
	echo "ckstream: JSON $srcs (CRIU's stats-dump from ckstream's work dir beside it). +sync = a \`sync\` right after the dump."
	echo "Disk limit = max(plain dump wall, archive bytes ÷ dd bandwidth); dd = \`dd bs=4M conv=fdatasync\` from a tmpfs source."
	echo
	echo "| MiB | fill | dd bytes | dd s | dd MB/s | plain dump wall s | plain freeze s | +sync s | plain LR dump wall s | plain LR freeze s | plain restore s |"
	echo "|---|---|---|---|---|---|---|---|---|---|---|"
	local mib fill c
	for mib in "${MIB_LIST[@]}"; do
		for fill in "${FILL_LIST[@]}"; do
			local dd_s dd_b
			dd_s=$(dmed wall "$mib" "$fill" dd write) dd_b=$(dmed bytes "$mib" "$fill" dd write)
			echo "| $mib | $fill | $(f 0 "$dd_b") | $(f 2 "$dd_s") | $(div "$dd_b" "$(awk -v s="$dd_s" 'BEGIN{print s * 1e6}')" 0) |" \
				"$(f 2 "$(dmed wall "$mib" "$fill" plain dump)") | $(f 2 "$(dmed freeze "$mib" "$fill" plain dump)") | $(f 2 "$(dmed sync "$mib" "$fill" plain dump)") |" \
				"$(f 2 "$(dmed wall "$mib" "$fill" plain-lr dump)") | $(f 2 "$(dmed freeze "$mib" "$fill" plain-lr dump)") | $(f 2 "$(dmed wall "$mib" "$fill" plain restore)") |"
		done
	done
	echo
	echo "| MiB | fill | ckstream -c | archive bytes | dump wall s | freeze s | CRIU stats freeze s | +sync s | LR dump wall s | LR freeze s | restore s | disk limit s | freeze ÷ disk limit (≤ 1.2) | freeze ÷ (plain dump + sync) (≤ 0.75) | LR freeze ÷ plain LR freeze (≤ 1.05) | restore ÷ plain restore (≤ 1.0) |"
	echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
	for mib in "${MIB_LIST[@]}"; do
		for fill in "${FILL_LIST[@]}"; do
			local pdw psy prw plrf bw
			pdw=$(dmed wall "$mib" "$fill" plain dump) psy=$(dmed sync "$mib" "$fill" plain dump)
			prw=$(dmed wall "$mib" "$fill" plain restore) plrf=$(dmed freeze "$mib" "$fill" plain-lr dump)
			bw=$(div "$(dmed bytes "$mib" "$fill" dd write)" "$(dmed wall "$mib" "$fill" dd write)" 0)
			for c in "${CODEC_LIST[@]}"; do
				local cs=ck-$c ab fr lrf rw lim
				ab=$(dmed bytes "$mib" "$fill" "$cs" dump) fr=$(dmed freeze "$mib" "$fill" "$cs" dump)
				lrf=$(dmed freeze "$mib" "$fill" "$cs-lr" dump) rw=$(dmed wall "$mib" "$fill" "$cs" restore)
				lim=""
				[[ -n $pdw && -n $ab && $bw != – ]] && lim=$(awk -v p="$pdw" -v b="$ab" -v bw="$bw" 'BEGIN{l = b / bw; printf "%.3f", (p > l ? p : l)}')
				echo "| $mib | $fill | $c | $(f 0 "$ab") | $(f 2 "$(dmed wall "$mib" "$fill" "$cs" dump)") | $(f 2 "$fr") |" \
					"$(f 2 "$(dmed stats_freeze "$mib" "$fill" "$cs" dump)") | $(f 2 "$(dmed sync "$mib" "$fill" "$cs" dump)") |" \
					"$(f 2 "$(dmed wall "$mib" "$fill" "$cs-lr" dump)") | $(f 2 "$lrf") | $(f 2 "$rw") | $(f 2 "$lim") |" \
					"$(div "$fr" "$lim") | $(div "$fr" "$(awk -v a="$pdw" -v b="$psy" 'BEGIN{print a + b}')") | $(div "$lrf" "$plrf") | $(div "$rw" "$prw") |"
			done
		done
	done
	echo
	echo "LR = --leave-running (plain: \`criu dump --leave-running\`). Per-step data: $(basename "$DTSV")."
}

# ------------------------------------------------------------------ run
if where shm; then
	shm_bench
	LOAD_SHM_END=$(loadavg)
fi
where disk && disk_bench
LOAD_END=$(loadavg)
log "load average at end: $LOAD_END"
{
	echo "# criu-bench $STAMP"
	echo
	if where shm; then
		shm_report
	else
		echo "ckstream $CK_REV ($CKSTREAM); criu: $("$CRIU" --version | head -1); kernel $(uname -r); $(nproc) CPUs;"
		echo "fs.pipe-max-size=$(cat /proc/sys/fs/pipe-max-size). Load average start: $LOAD_START, end: $LOAD_END."
	fi
	if where disk; then
		echo
		disk_report
	fi
} | tee "$REPORT"
log "report: $REPORT"


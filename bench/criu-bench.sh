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
# Env: MIB (2048) REPS (3) MODES ("plain none zstd lz4") MEMTEST_FILL (random)
#      SHM (/dev/shm) NO_BUILD=1 (skip cargo build) CKSTREAM CRIU TIMEOUT (900 s/step)

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

WORK="" CG="" IMG="$SHM/criu-bench.$$"
remove_cg() {
	[[ -n $CG && -d $CG ]] || return 0
	for _ in $(seq 50); do [[ -s $CG/cgroup.procs ]] || break; sleep 0.1; done
	rmdir "$CG" 2>/dev/null || log "warning: could not remove cgroup $CG"
}
# shellcheck disable=SC2016 # expanded at exit
on_exit 'rm -rf "$IMG" "$IMG.cka" "$WORK"'
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
need_tools "$CRIU" gcc jq "$TIME" timeout
need_ckstream
WORK=$(mktemp -d /tmp/criu-bench.XXXXXX)
LOAD_START=$(loadavg)
log "load average at start: $LOAD_START"

if [[ -d $CG_ROOT && -w $CG_ROOT ]] && mkdir "$CG_ROOT/criu-bench.$$" 2>/dev/null; then
	CG=$CG_ROOT/criu-bench.$$
	CPU_METHOD="cgroup v1 cpuacct ($CG, removed afterwards): cpuacct.usage delta around each step"
else
	CPU_METHOD="not measured (no writable cgroup-v1 cpuacct hierarchy)"
	log "warning: total CPU not measurable: $CPU_METHOD"
fi

build_memtest "$WORK"
HB=$WORK/hb
log "starting memtest $MIB MiB (MEMTEST_FILL=${MEMTEST_FILL:-random})"
start_memtest --via in_cg "$MIB" "$HB"
log "memtest pid $MT_PID ready"

show_fail() { # file...
	local f
	for f in "$@"; do [[ -s $f ]] && { log "--- tail $f"; tail -20 "$f" >&2; }; done
	return 0
}

COLS="rep mode dump_wall dump_ck_seconds dump_since_freeze dump_ck_cpu dump_ck_rss_kib dump_criu_cpu dump_criu_rss_kib dump_total_cpu image_bytes archive_bytes restore_wall restore_ck_cpu restore_ck_rss_kib restore_criu_cpu restore_criu_rss_kib restore_total_cpu load1"
echo "$COLS" | tr ' ' '\t' >"$TSV"

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
for ((rep = 1; rep <= REPS; rep++)); do
	for ((k = 0; k < N; k++)); do
		m=${MODE_LIST[$(((k + rep - 1) % N))]}   # rotate the order each rep
		if [[ $m == plain ]]; then run_plain "$rep"; else run_ck "$rep" "$m"; fi
	done
done
LOAD_END=$(loadavg)
log "load average at end: $LOAD_END"

# ------------------------------------------------------------------ summary
# med MODE COLUMN: median over reps (empty if no values)
med() { tsv_med "$TSV" "$2" mode="$1"; }
mib() { [[ -n $1 ]] && awk -v v="$1" 'BEGIN{printf "%.1f", v/1024}' || printf '–'; }
gb() { awk -v v="$1" 'BEGIN{printf "%.4f", v/1e9}'; }

P_DW=$(med plain dump_wall) P_RW=$(med plain restore_wall)
N_RW=$(med none restore_wall)
{
	echo "# criu-bench $STAMP"
	echo
	echo "memtest ${MIB} MiB (MEMTEST_FILL=${MEMTEST_FILL:-random}), same process dumped/restored repeatedly, medians of REPS=$REPS."
	echo "ckstream $CK_REV ($CKSTREAM); criu: $("$CRIU" --version | head -1); kernel $(uname -r); $(nproc) CPUs;"
	echo "fs.pipe-max-size=$(cat /proc/sys/fs/pipe-max-size); images/archives on $SHM (tmpfs). Load average start: $LOAD_START, end: $LOAD_END."
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
} | tee "$REPORT"
log "report: $REPORT"

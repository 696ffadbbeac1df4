#!/usr/bin/env bash
# lazy.sh — lazy (post-copy) restore against full restores, side by side in one run:
#   plain        `criu dump -t PID -D $SHM/imgs`, `criu restore -D $SHM/imgs -d`
#   ck           `ckstream dump -c zstd` to ARCHIVE, `ckstream restore ARCHIVE`
#   ck-lazy      the same archive, `ckstream restore --lazy --wait --json ARCHIVE`
# with ARCHIVE on tmpfs ($SHM, "local") and in the local S3 server (SeaweedFS on
# 127.0.0.1, "s3"), for a memtest of each size in MIBS (random memory, one process,
# heartbeat every 10 ms). The same memtest is dumped (killed) and restored over and over,
# the order of the modes rotating each rep; after every restore it must beat and
# re-verify its whole buffer (lib.sh verify_restored).
#
# Per restore:
#   first hb     command start -> the restored memtest's first heartbeat (the file
#                polled every ~2 ms): when the application runs again
#   complete     command start -> command end; for ck-lazy (--wait) that is when every
#                page is in, and the JSON's seconds_to_running is printed beside it
#   peak RSS     /usr/bin/time %M of the command, which includes the background page
#                server it waits for (ck-lazy)
# Medians of REPS; report bench/out/lazy-<date>.md, every run in bench/out/lazy-<date>.tsv.
# Targets (issue 12): first hb <= 0.15 s local, <= 0.5 s from S3, the same at every size;
# complete <= 1.2x ck; peak RSS <= 128 MiB.
#
# Env: MIBS ("1024 4096") REPS (3) SHM (/dev/shm) MODES ("plain ck ck-lazy")
#      PLACES ("local s3") NO_BUILD=1 CKSTREAM CRIU S3_PORT (28434)

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIBS=${MIBS:-1024 4096}
REPS=${REPS:-3}
SHM=${SHM:-/dev/shm}
MODES=${MODES:-plain ck ck-lazy}
PLACES=${PLACES:-local s3}
CRIU=${CRIU:-/usr/local/sbin/criu}
export CKSTREAM_CRIU=${CKSTREAM_CRIU:-$CRIU}
export CKSTREAM_S3_DIR=${CKSTREAM_S3_DIR:-/var/tmp/ckstream-lazy-bench.$$}
export CKSTREAM_S3_PORT=${S3_PORT:-28434}
export CKSTREAM_S3_BUCKET=bench
export MEMTEST_TICK_MS=10 MEMTEST_FILL=random

WORK=""
# shellcheck disable=SC2016 # expanded at exit
on_exit 'rm -rf "$WORK" "$CKSTREAM_S3_DIR"'
on_exit kill_memtest
need_tools jq
need_ckstream
WORK=$(mktemp -d "$SHM/lazy-bench.XXXXXX")
build_memtest "$WORK"
HB=$WORK/hb
if [[ " $PLACES " == *" s3 "* ]]; then
	# shellcheck disable=SC2016
	on_exit '"$REPO/scripts/s3-server.sh" stop >/dev/null 2>&1'
	eval "$("$REPO/scripts/s3-server.sh" start)"
fi
log "load average at start: $(loadavg)"
printf 'mib\tplace\tmode\trep\tfirst_hb\tcomplete\trunning_json\tpeak_rss_kib\tlazy_bytes\tprefetched\ton_demand\n' >"$TSV"

# timed_restore LABEL CMD...: runs CMD, measures its first heartbeat and its end; sets
# FIRST COMPLETE RSS OUT (the command's stdout).
timed_restore() {
	local hb0 t0 pid hb first="" t_end rc
	read -r hb0 <"$HB"
	t0=$(now)
	/usr/bin/time -f '%M' -o "$WORK/time" "${@:2}" >"$WORK/out" 2>"$WORK/err" &
	pid=$!
	# Until the first heartbeat or the command's end, whichever comes first.
	while :; do
		hb=$hb0
		read -r hb <"$HB" 2>/dev/null || true
		if [[ $hb != "$hb0" ]]; then
			first=$(now)
			break
		fi
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.002
	done
	rc=0
	wait "$pid" || rc=$?
	t_end=$(now)
	# A restore may return before the restored process beats.
	while [[ -z $first ]]; do
		hb=$hb0
		read -r hb <"$HB" 2>/dev/null || true
		[[ $hb != "$hb0" ]] && first=$(now)
		sleep 0.002
	done
	if ((rc != 0)); then
		cat "$WORK/err" >&2
		die "$1 failed (exit $rc)"
	fi
	RSS=$(tail -1 "$WORK/time")
	FIRST=$(fsub "$first" "$t0" 3)
	COMPLETE=$(fsub "$t_end" "$t0" 3)
	OUT=$(cat "$WORK/out")
}

dump_for() {
	local place=$1 mode=$2
	case $mode in
	plain)
		rm -rf "$WORK/imgs" && mkdir "$WORK/imgs"
		"$CRIU" dump -t "$MT_PID" -D "$WORK/imgs" -o dump.log -v4 || die "criu dump failed"
		;;
	*)
		"$CKSTREAM" dump -q --pid "$MT_PID" -c zstd -o "$(archive "$place")" || die "ckstream dump failed"
		;;
	esac
	wait_gone
}

archive() { if [[ $1 == s3 ]]; then echo "s3://$CKSTREAM_S3_BUCKET/lazy.cka"; else echo "$WORK/lazy.cka"; fi; }

for mib in $MIBS; do
	log "memtest $mib MiB"
	start_memtest "$mib" "$HB"
	steps=()
	for place in $PLACES; do
		for mode in $MODES; do
			[[ $mode == plain && $place == s3 ]] && continue
			steps+=("$place:$mode")
		done
	done
	for ((rep = 1; rep <= REPS; rep++)); do
		n=${#steps[@]}
		for ((k = 0; k < n; k++)); do
			step=${steps[$(((k + rep) % n))]}
			place=${step%%:*} mode=${step#*:}
			dump_for "$place" "$mode"
			case $mode in
			plain) timed_restore plain "$CRIU" restore -D "$WORK/imgs" -d -o restore.log -v4 ;;
			ck) timed_restore ck "$CKSTREAM" restore -q "$(archive "$place")" ;;
			ck-lazy) timed_restore ck-lazy "$CKSTREAM" restore --lazy --wait --json "$(archive "$place")" ;;
			esac
			running="" lazy="" pre="" dem=""
			if [[ $mode == ck-lazy ]]; then
				running=$(jq -r .seconds_to_running <<<"$OUT")
				lazy=$(jq -r .lazy_bytes <<<"$OUT")
				pre=$(jq -r .bytes_prefetched <<<"$OUT")
				dem=$(jq -r .bytes_on_demand <<<"$OUT")
			fi
			verify_restored "$mib MiB $place $mode rep $rep" "$HB"
			log "$mib MiB $place $mode: first hb $FIRST s, complete $COMPLETE s${running:+, running (JSON) $running s}, peak RSS ${RSS:-?} KiB"
			printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mib" "$place" "$mode" "$rep" "$FIRST" "$COMPLETE" \
				"$running" "$RSS" "$lazy" "$pre" "$dem" >>"$TSV"
		done
	done
	kill_memtest
done

med() { awk -F'\t' -v m="$1" -v p="$2" -v s="$3" -v c="$4" 'NR > 1 && $1 == m && $2 == p && $3 == s {print $c}' "$TSV" | median; }
{
	echo "# lazy restore bench $STAMP"
	echo
	echo "- host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo) RAM, kernel $(uname -r)"
	echo "- ckstream $CK_REV; $("$CRIU" --version | head -1)"
	echo "- REPS=$REPS, memtest random memory (one process), heartbeat every 10 ms; load average at end $(loadavg)"
	echo
	echo "| memory | archive | mode | first heartbeat s | complete s | running (JSON) s | peak RSS MiB | first hb ÷ plain | complete ÷ ck |"
	echo "|---|---|---|--:|--:|--:|--:|--:|--:|"
	for mib in $MIBS; do
		plain_first=$(med "$mib" local plain 5)
		for place in $PLACES; do
			ck_complete=$(med "$mib" "$place" ck 6)
			for mode in $MODES; do
				[[ $mode == plain && $place == s3 ]] && continue
				first=$(med "$mib" "$place" "$mode" 5)
				complete=$(med "$mib" "$place" "$mode" 6)
				running=$(med "$mib" "$place" "$mode" 7)
				rss=$(med "$mib" "$place" "$mode" 8)
				echo "| $mib MiB | $place | $mode | $(f 3 "$first") | $(f 3 "$complete") | $(f 3 "$running") | $(awk -v k="${rss:-0}" 'BEGIN{printf "%.0f", k/1024}') | $(div "$first" "$plain_first") | $(div "$complete" "$ck_complete") |"
			done
		done
	done
	echo
	echo "Per-run data: $(basename "$TSV")."
} | tee "$REPORT"
log "report: $REPORT"

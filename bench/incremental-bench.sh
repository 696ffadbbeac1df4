#!/usr/bin/env bash
# incremental-bench.sh — checkpoints of a changing process, full vs incremental, in one run.
#
# One memtest process (MIB MiB of noise, MEMTEST_FILL) is checkpointed GENS times with
# `--leave-running`; before every checkpoint after the first it changes its memory
# (SIGUSR2, tests/progs/memtest.c) as MUTATE says:
#   runs    (default) 2% rewritten in 128 KiB runs spread evenly over the heap
#   insert  the same, and before generation 2 a fresh 100 MiB mapping below the heap, so
#           every heap page moves by 100 MiB in CRIU's page image
#   pages   2% rewritten as single 4 KiB pages scattered evenly (the worst case)
# Each
# generation is dumped three ways, in rotating order:
#   criu     `criu dump --leave-running -t PID -D DIR` (plain CRIU, the images as files)
#   full     `ckstream dump --leave-running -c C -o full-N.cka`
#   incr     `ckstream dump --leave-running -c C -o incr-N.cka --parent incr-(N-1).cka`
# and then the process is killed and generation GENS restored from the last full archive
# and from the end of the incremental chain (memory verified each time), REPS times.
# Reported: bytes each generation stored (incr as % of full), dump wall and freeze,
# restore wall of the chain vs the full archive, and of restic (`restic restore` of the
# last snapshot, then `criu restore -D -d`). Directory: DIR (default
# /var/tmp/ckstream-incr-bench, a real disk here; DIR=/dev/shm/... for tmpfs); caches
# dropped before every restore with DROP_CACHES=1, else the archives a local restore
# reads are read once first (the chain's oldest was written long before). With S3=1 the last full archive and
# the chain are also copied to a local SeaweedFS (scripts/s3-server.sh) with `aws s3 cp`
# and restored from there (s3://BUCKET/incr/...), the chain finding its parents beside it.
#
# Env: MIB (2048) GENS (5) REPS (3) C (zstd:1) MUTATE (runs) DIR DROP_CACHES (0) S3 (0)
#      CKSTREAM CRIU NO_BUILD; restic is skipped when it is not installed (scripts/
#      install-deps.sh installs it where the package lists have it).

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIB=${MIB:-2048}
GENS=${GENS:-5}
REPS=${REPS:-3}
C=${C:-zstd:1}
DIR=${DIR:-/var/tmp/ckstream-incr-bench}
DROP_CACHES=${DROP_CACHES:-0}
MUTATE=${MUTATE:-runs}
S3=${S3:-0}
CRIU=${CRIU:-criu}
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=$REPO/bench/out
TSV=$OUT/incremental-bench-$STAMP.tsv
REPORT=$OUT/incremental-bench-$STAMP.md

[[ $(id -u) == 0 ]] || die "must run as root (CRIU)"
need_tools gcc jq "$CRIU"
RESTIC=$(command -v restic || true)
[[ -n $RESTIC ]] || log "restic not installed: no restic column"
NO_BUILD=${NO_BUILD-1} need_ckstream
mkdir -p "$OUT" "$DIR"
WORK=$(mktemp -d "$DIR/run.XXXXXX")
on_exit kill_memtest
on_exit rm -rf "$WORK"
build_memtest "$WORK"
HB=$WORK/hb
export MEMTEST_MUTATE=$MUTATE
restore_places=(local)
if [[ $S3 == 1 ]]; then
	VENV=${CKSTREAM_S3_VENV:-/var/cache/ckstream/seaweedfs-venv}
	export CKSTREAM_S3_DIR=$DIR/s3-data CKSTREAM_S3_PORT=${S3_PORT:-18533} CKSTREAM_S3_BUCKET=bench
	# shellcheck disable=SC2016 # expanded at exit
	on_exit '"$REPO/scripts/s3-server.sh" stop >/dev/null 2>&1; rm -rf "$CKSTREAM_S3_DIR"'
	"$REPO/scripts/s3-server.sh" install >&2
	eval "$("$REPO/scripts/s3-server.sh" start)"
	restore_places+=(s3)
fi
s3cp() { "$VENV/bin/aws" --endpoint-url "$AWS_ENDPOINT_URL" s3 cp --only-show-errors "$@"; }

echo -e "rep\tgen\ttool\top\twall\tfreeze\tbytes" >"$TSV"
row() { printf '%s\n' "$(IFS=$'\t'; echo "$*")" >>"$TSV"; }


dump_ck() { # NAME [--parent P]
	local out=$WORK/$1.cka t0 t1 j
	shift
	t0=$(now)
	j=$("$CKSTREAM" dump -q --pid "$MT_PID" -o "$out" -c "$C" --leave-running --json "$@") ||
		die "ckstream dump failed"
	t1=$(now)
	printf '%s\t%s\t%s\n' "$(fsub "$t1" "$t0")" "$(jq -r .freeze_seconds <<<"$j")" "$(jq -r .archive_bytes <<<"$j")"
}

# CRIU's images go to the same directory every generation, so restic sees one path change.
dump_criu() {
	local d=$WORK/criu t0 t1
	rm -rf "$d"
	mkdir -p "$d"
	t0=$(now)
	"$CRIU" dump --leave-running -t "$MT_PID" -D "$d" -o dump.log --shell-job >/dev/null 2>&1 ||
		die "criu dump failed (log: $d/dump.log)"
	t1=$(now)
	printf '%s\t%s\t%s\n' "$(fsub "$t1" "$t0")" "$(criu_freeze "$d/stats-dump")" "$(tree_bytes "$d" -name '*.img')"
}

export RESTIC_PASSWORD=bench RESTIC_REPOSITORY=$WORK/restic
backup_restic() { # prints wall and the bytes the backup added to the repository
	local before t0 t1
	before=$(du -sb "$RESTIC_REPOSITORY" | cut -f1)
	t0=$(now)
	"$RESTIC" backup -q --host bench "$WORK/criu" >/dev/null || die "restic backup failed"
	t1=$(now)
	printf '%s\t%s\n' "$(fsub "$t1" "$t0")" "$(($(du -sb "$RESTIC_REPOSITORY" | cut -f1) - before))"
}

LOAD_START=$(loadavg)
log "load average at start: $LOAD_START; ckstream $CKSTREAM; $MIB MiB, $GENS generations, $REPS reps, -c $C, in $DIR"
for rep in $(seq "$REPS"); do
	rm -rf "$WORK"/*.cka "$WORK"/*.cka.* "$RESTIC_REPOSITORY"
	[[ -n $RESTIC ]] && { "$RESTIC" init -q --repository-version 2 >/dev/null || die "restic init failed"; }
	start_memtest "$MIB" "$HB"
	for gen in $(seq "$GENS"); do
		if ((gen > 1)); then
			kill -USR2 "$MT_PID"
			for _ in $(seq 300); do grep -q "^mutated=$((gen - 1))$" "$HB.log" 2>/dev/null && break; sleep 0.1; done
			grep -q "^mutated=$((gen - 1))$" "$HB.log" || die "memtest did not change its memory"
		fi
		tools=(criu full incr)
		k=$(((gen + rep) % 3))
		tools=("${tools[@]:k}" "${tools[@]:0:k}")
		for tool in "${tools[@]}"; do
			sync
			case $tool in
			criu) r=$(dump_criu) ;;
			full) r=$(dump_ck "full-$gen") ;;
			incr)
				if ((gen == 1)); then r=$(dump_ck "incr-1"); else r=$(dump_ck "incr-$gen" --parent "$WORK/incr-$((gen - 1)).cka"); fi
				;;
			esac
			IFS=$'\t' read -r wall freeze bytes <<<"$r"
			row "$rep" "$gen" "$tool" dump "$wall" "$freeze" "$bytes"
			log "rep $rep gen $gen $tool: dump ${wall}s, frozen ${freeze}s, ${bytes} B"
			if [[ $tool == criu && -n $RESTIC ]]; then
				IFS=$'\t' read -r wall bytes <<<"$(backup_restic)"
				row "$rep" "$gen" restic backup "$wall" "" "$bytes"
				log "rep $rep gen $gen restic backup: ${wall}s, ${bytes} B added"
			fi
		done
		((gen > 1)) && rm -f "$WORK/full-$((gen - 1)).cka" # only the last one is restored
	done
	kill_memtest
	if [[ $S3 == 1 ]]; then
		for f in "$WORK/full-$GENS.cka" "$WORK"/incr-*.cka; do s3cp "$f" "s3://bench/incr/$(basename "$f")"; done
	fi
	rm -rf "$WORK/criu"
	if [[ -n $RESTIC ]]; then
		[[ $DROP_CACHES == 1 ]] && drop_caches
		t0=$(now)
		"$RESTIC" restore -q latest --target "$WORK/restic-out" >/dev/null || die "restic restore failed"
		t1=$(now)
		(cd "$WORK/restic-out$WORK/criu" && "$CRIU" restore -D . -o restore.log -d --shell-job >/dev/null 2>&1) ||
			die "criu restore of restic's images failed"
		t2=$(now)
		MT_PID=$(cat "$HB.pid")
		verify_restored "restic restore + criu restore" "$HB"
		row "$rep" "$GENS" restic restore-local "$(fsub "$t2" "$t0")" "$(fsub "$t1" "$t0")" ""
		log "rep $rep: restic restore $(fsub "$t1" "$t0")s + criu restore $(fsub "$t2" "$t1")s, verified"
		kill_memtest
		rm -rf "$WORK/restic-out"
	fi
	for place in "${restore_places[@]}"; do
		for tool in full incr; do
			src=$WORK/$tool-$GENS.cka
			[[ $place == s3 ]] && src=s3://bench/incr/$tool-$GENS.cka
			if [[ $DROP_CACHES == 1 ]]; then
				drop_caches
			elif [[ $place == local ]]; then
				# Warm means warm for both: the chain's oldest archive was written many
				# gigabytes ago and may have left the page cache since.
				cat "$WORK/$tool"-*.cka >/dev/null
			fi
			t0=$(now)
			"$CKSTREAM" restore -q "$src" || die "restore of $src failed"
			t1=$(now)
			MT_PID=$(cat "$HB.pid")
			verify_restored "restore $src" "$HB"
			row "$rep" "$GENS" "$tool" "restore-$place" "$(fsub "$t1" "$t0")" "" ""
			log "rep $rep: restore of $src $(fsub "$t1" "$t0")s, verified"
			kill_memtest
		done
	done
done

med() { tsv_med "$TSV" "$1" gen="$2" tool="$3" op="$4"; }
{
	echo "# Incremental checkpoints ($STAMP)"
	echo
	echo "ckstream $("$CKSTREAM" --version), memtest $MIB MiB of noise ($(nproc) cores), changed before each generation: MUTATE=$MUTATE,"
	echo "$GENS generations, medians of $REPS reps, \`-c $C\`, directory $DIR ($(df --output=fstype "$DIR" | tail -1)), caches dropped before restores: $DROP_CACHES."
	echo "Load average at start $LOAD_START, at end $(loadavg). Command: \`MIB=$MIB GENS=$GENS REPS=$REPS C=$C MUTATE=$MUTATE DIR=$DIR DROP_CACHES=$DROP_CACHES S3=$S3 bash bench/incremental-bench.sh\`"
	echo
	echo "| gen | criu dump -D: s / frozen s / image bytes | full .cka: s / frozen s / bytes | incremental: s / frozen s / bytes | incr bytes % of full | incr wall ÷ full | restic backup of the criu images: s / bytes added (% of full) |"
	echo "|---|---|---|---|---|---|---|"
	for gen in $(seq "$GENS"); do
		fb=$(med bytes "$gen" full dump)
		ib=$(med bytes "$gen" incr dump)
		echo "| $gen | $(f 2 "$(med wall "$gen" criu dump)") / $(f 2 "$(med freeze "$gen" criu dump)") / $(med bytes "$gen" criu dump) |" \
			"$(f 2 "$(med wall "$gen" full dump)") / $(f 2 "$(med freeze "$gen" full dump)") / $fb |" \
			"$(f 2 "$(med wall "$gen" incr dump)") / $(f 2 "$(med freeze "$gen" incr dump)") / $ib |" \
			"$(awk -v a="$ib" -v b="$fb" 'BEGIN{printf "%.1f", 100*a/b}') | $(div "$(med wall "$gen" incr dump)" "$(med wall "$gen" full dump)") |" \
			"$(f 2 "$(med wall "$gen" restic backup)") / $(med bytes "$gen" restic backup) ($(awk -v a="$(med bytes "$gen" restic backup)" -v b="$fb" 'BEGIN{if (a == "") print "–"; else printf "%.1f", 100*a/b}')) |"
	done
	echo
	for place in "${restore_places[@]}"; do
		fr=$(med wall "$GENS" full "restore-$place")
		ir=$(med wall "$GENS" incr "restore-$place")
		echo "Restore of generation $GENS ($place): from its full archive $(f 2 "$fr") s, from the end of the chain $(f 2 "$ir") s ($(div "$ir" "$fr") ×)."
	done
	rr=$(med wall "$GENS" restic restore-local)
	[[ -n $rr ]] && echo "restic: \`restic restore\` of the last snapshot $(f 2 "$(med freeze "$GENS" restic restore-local)") s, then \`criu restore\`: $(f 2 "$rr") s in all ($(div "$rr" "$(med wall "$GENS" full restore-local)") × ckstream's full archive)."
	true
	echo
	echo "Per-run data: $(basename "$TSV")."
} | tee "$REPORT"

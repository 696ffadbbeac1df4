#!/usr/bin/env bash
# inspect-bench.sh — what is in a checkpoint, answered from the index vs from a full read.
#
# One memtest tree (MIB MiB of noise, one child) is dumped twice: by `ckstream dump`
# (`-c zstd:1`, a .cka) and by plain `criu dump -D`, whose image directory is then packed
# as podman exports a checkpoint: `tar -c | zstd -1 -T0` (podman's default format). Then,
# caches warm and dropped (DROP_CACHES=1 drops them before every cold run):
#   ckstream   `ckstream inspect` (summary), `inspect --all` (every section, command
#              lines read from memory), `inspect --json`, `diff` of the .cka with itself
#   s3         the same `inspect --json` of the .cka in a local SeaweedFS: wall, GET
#              requests and bytes (CKSTREAM_S3_STATS), against the archive's size
#   full read  `zstd -dc | tar -t` of the tar.zst: the least any tool reading podman's
#              export must do (checkpointctl decompresses and extracts the whole archive;
#              it is not in the package lists, and its Go modules cannot be fetched here)
# Reported: medians of REPS runs. Directory: DIR (default /var/tmp/ckstream-inspect-bench,
# a real disk here).
#
# Env: MIB (4096) REPS (5) DIR DROP_CACHES (1) S3 (1) CKSTREAM CRIU NO_BUILD

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIB=${MIB:-4096}
REPS=${REPS:-5}
DIR=${DIR:-/var/tmp/ckstream-inspect-bench}
DROP_CACHES=${DROP_CACHES:-1}
S3=${S3:-1}
CRIU=${CRIU:-criu}
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=$REPO/bench/out
TSV=$OUT/inspect-bench-$STAMP.tsv
REPORT=$OUT/inspect-bench-$STAMP.md

[[ $(id -u) == 0 ]] || die "must run as root (CRIU)"
need_tools gcc jq zstd tar "$CRIU"
NO_BUILD=${NO_BUILD-1} need_ckstream
mkdir -p "$OUT" "$DIR"
WORK=$(mktemp -d "$DIR/run.XXXXXX")
on_exit kill_memtest
on_exit rm -rf "$WORK"
build_memtest "$WORK"
HB=$WORK/hb
echo -e "op\tcache\twall\trequests\tbytes" >"$TSV"
row() { printf '%s\n' "$(IFS=$'\t'; echo "$*")" >>"$TSV"; }

log "load average at start: $(loadavg); $MIB MiB, $REPS reps, in $DIR"
start_memtest "$MIB" "$HB" 1
"$CKSTREAM" dump -q --pid "$MT_PID" -o "$WORK/ckpt.cka" -c zstd:1 --leave-running || die "ckstream dump failed"
mkdir "$WORK/images"
"$CRIU" dump -t "$MT_PID" -D "$WORK/images" -o dump.log --shell-job >/dev/null 2>&1 || die "criu dump failed"
MT_PID=""
tar -C "$WORK" -c images | zstd -q -1 -T0 -o "$WORK/export.tar.zst"
rm -rf "$WORK/images"
CKA_BYTES=$(stat -c %s "$WORK/ckpt.cka")
TAR_BYTES=$(stat -c %s "$WORK/export.tar.zst")
log "ckpt.cka $CKA_BYTES B, export.tar.zst $TAR_BYTES B"

timed() { # OP CACHE CMD...: one timed run, output discarded
	local op=$1 cache=$2 t0 t1
	shift 2
	[[ $cache == cold ]] && drop_caches
	t0=$(now)
	"$@" >/dev/null 2>"$WORK/err" || die "$op failed: $(cat "$WORK/err")"
	t1=$(now)
	row "$op" "$cache" "$(fsub "$t1" "$t0")" "" ""
}

caches=(warm)
[[ $DROP_CACHES == 1 ]] && caches+=(cold)
for rep in $(seq "$REPS"); do
	for cache in "${caches[@]}"; do
		timed summary "$cache" "$CKSTREAM" inspect "$WORK/ckpt.cka"
		timed all "$cache" "$CKSTREAM" inspect --all "$WORK/ckpt.cka"
		timed json "$cache" "$CKSTREAM" inspect --json "$WORK/ckpt.cka"
		timed diff "$cache" "$CKSTREAM" diff "$WORK/ckpt.cka" "$WORK/ckpt.cka"
		timed full-read "$cache" bash -c "zstd -dc '$WORK/export.tar.zst' | tar -t"
	done
	log "rep $rep done"
done

if [[ $S3 == 1 ]]; then
	VENV=${CKSTREAM_S3_VENV:-/var/cache/ckstream/seaweedfs-venv}
	export CKSTREAM_S3_DIR=$DIR/s3-data CKSTREAM_S3_PORT=${S3_PORT:-18633} CKSTREAM_S3_BUCKET=bench
	# shellcheck disable=SC2016 # expanded at exit
	on_exit '"$REPO/scripts/s3-server.sh" stop >/dev/null 2>&1; rm -rf "$CKSTREAM_S3_DIR"'
	"$REPO/scripts/s3-server.sh" install >&2
	eval "$("$REPO/scripts/s3-server.sh" start)"
	"$VENV/bin/aws" --endpoint-url "$AWS_ENDPOINT_URL" s3 cp --only-show-errors "$WORK/ckpt.cka" s3://bench/ckpt.cka
	for rep in $(seq "$REPS"); do
		t0=$(now)
		CKSTREAM_S3_STATS=1 "$CKSTREAM" inspect --json s3://bench/ckpt.cka >/dev/null 2>"$WORK/err" || die "s3 inspect failed: $(cat "$WORK/err")"
		t1=$(now)
		stats=$(grep '^ckstream-s3-stats: ' "$WORK/err" | sed 's/^ckstream-s3-stats: //')
		row s3-json remote "$(fsub "$t1" "$t0")" "$(jq -r '.get_requests // .requests // empty' <<<"$stats")" "$(jq -r '.get_bytes // .bytes_read // empty' <<<"$stats")"
		log "s3 rep $rep: $(fsub "$t1" "$t0") s, $stats"
	done
fi

med() { tsv_med "$TSV" "$1" op="$2" cache="$3"; }
{
	echo "# Inspecting a checkpoint ($STAMP)"
	echo
	echo "ckstream $("$CKSTREAM" --version), memtest $MIB MiB of noise + one child ($(nproc) cores), medians of $REPS runs,"
	echo "directory $DIR ($(df --output=fstype "$DIR" | tail -1)). ckpt.cka $CKA_BYTES B (\`-c zstd:1\`); export.tar.zst $TAR_BYTES B (\`tar | zstd -1 -T0\` of \`criu dump -D\`)."
	echo "Command: \`MIB=$MIB REPS=$REPS DROP_CACHES=$DROP_CACHES S3=$S3 bash bench/inspect-bench.sh\`"
	echo
	echo "| | warm s | cold s |"
	echo "|---|---|---|"
	for op in summary all json diff full-read; do
		echo "| $op | $(f 3 "$(med wall "$op" warm)") | $(f 3 "$(med wall "$op" cold)") |"
	done
	echo
	echo "Full read ÷ \`inspect --all\`: $(div "$(med wall full-read warm)" "$(med wall all warm)" 0) × warm, $(div "$(med wall full-read cold)" "$(med wall all cold)" 0) × cold."
	if [[ $S3 == 1 ]]; then
		echo
		echo "From S3: \`inspect --json\` $(f 3 "$(med wall s3-json remote)") s, $(med requests s3-json remote) GET requests, $(med bytes s3-json remote) bytes ($(awk -v a="$(med bytes s3-json remote)" -v b="$CKA_BYTES" 'BEGIN{if (a == "") print "–"; else printf "%.3f", 100*a/b}') % of the archive)."
	fi
	echo
	echo "Per-run data: $(basename "$TSV")."
} | tee "$REPORT"

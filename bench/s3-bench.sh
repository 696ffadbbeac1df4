#!/usr/bin/env bash
# s3-bench.sh — ckstream against a local SeaweedFS S3 server (scripts/s3-server.sh),
# side by side in one run:
#   (a) upload of a GIB GiB dataset (half urandom, half text, plus one 1 MiB file):
#       `ckstream pack -c none` with 1 and with 4 shards, `ckstream pack -c zstd:1`
#       with 4 shards, vs a single-stream upload of a tar of the same bytes (one
#       SigV4-signed `curl -T` PUT) and vs `aws s3 cp` of that tar (multipart, 10 threads);
#   (b) `ls` and `cat` of the 1 MiB file from the remote archive: requests and bytes
#       (CKSTREAM_S3_STATS=1) vs downloading the whole archive first;
#   (c) a live MIB MiB memtest process (MEMTEST_FILL=mixed): `ckstream dump` straight to
#       s3://, then `ckstream restore s3://...` (streaming) vs downloading the shards with
#       `aws s3 cp` to /dev/shm and restoring from there: wall time and ckstream's peak
#       RSS. Memory is verified after every restore.
# Ratios are printed; the report goes to bench/out/s3-bench-<date>.md.
#
# Env: GIB (2) MIB (2048) SHARDS (4) NO_BUILD=1 (skip cargo build) SHM (/dev/shm)
#      CKSTREAM CRIU S3_PORT (28433) SKIP_CRIU=1

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

GIB=${GIB:-2}
MIB=${MIB:-2048}
SHARDS=${SHARDS:-4}
SHM=${SHM:-/dev/shm}
CRIU=${CRIU:-/usr/local/sbin/criu}
export CKSTREAM_CRIU=${CKSTREAM_CRIU:-$CRIU}
VENV=${CKSTREAM_S3_VENV:-/var/cache/ckstream/seaweedfs-venv}
export CKSTREAM_S3_DIR=${CKSTREAM_S3_DIR:-/var/tmp/ckstream-s3-bench.$$}
export CKSTREAM_S3_PORT=${S3_PORT:-28433}
export CKSTREAM_S3_BUCKET=bench

WORK=""
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b == 0) print "n/a"; else printf "%.2f", a/b}'; }
# dsec T1 T0: seconds between two readings, as the report prints them (2 decimals).
dsec() { fsub "$1" "$2" 2; }

# shellcheck disable=SC2016 # expanded at exit
on_exit 'rm -rf "$WORK" "$CKSTREAM_S3_DIR"'
# shellcheck disable=SC2016
on_exit '"$REPO/scripts/s3-server.sh" stop >/dev/null 2>&1'
on_exit kill_memtest

need_tools jq curl tar
need_ckstream
WORK=$(mktemp -d "$SHM/s3-bench.XXXXXX")
log "load average at start: $(loadavg)"

eval "$("$REPO/scripts/s3-server.sh" start)"
AWS="$VENV/bin/aws --endpoint-url $AWS_ENDPOINT_URL"
B=s3://$CKSTREAM_S3_BUCKET

# ---- dataset ----
log "making the ${GIB} GiB dataset in $WORK/data"
mkdir -p "$WORK/data/random" "$WORK/data/text"
half_mib=$((GIB * 512))
for ((i = 0; i < half_mib / 64; i++)); do
	head -c 64M /dev/urandom >"$WORK/data/random/r$i"
done
# Text: numbered lines, 64 MiB per file.
for ((i = 0; i < half_mib / 64; i++)); do
	{ seq -f "line %.0f of a text log with some repeated words in it" $((i * 1200000)) $(((i + 1) * 1200000)) \
		|| true; } | head -c 64M >"$WORK/data/text/t$i"
done
head -c 1M /dev/urandom >"$WORK/data/one-mib"
DATA_BYTES=$(du -sb --apparent-size "$WORK/data" | cut -f1)
log "dataset: $DATA_BYTES bytes"

stats() { grep '^ckstream-s3-stats: ' "$1" | sed 's/^ckstream-s3-stats: //'; }

# ---- (a) uploads ----
declare -A WALL BYTES
upload_ck() { # name codec shards
	local name=$1 codec=$2 shards=$3 t0 t1
	t0=$(now)
	"$CKSTREAM" pack -q --json -c "$codec" --shards "$shards" -o "$B/$name.cka" "$WORK/data" >"$WORK/$name.json"
	t1=$(now)
	WALL[$name]=$(dsec "$t1" "$t0")
	BYTES[$name]=$(jq .archive_bytes "$WORK/$name.json")
	log "$name: ${WALL[$name]} s, ${BYTES[$name]} bytes ($(mb_s "$DATA_BYTES" "${WALL[$name]}") MB/s of data)"
}
upload_ck pack-none-1 none 1
upload_ck "pack-none-$SHARDS" none "$SHARDS"
upload_ck "pack-zstd-$SHARDS" zstd:1 "$SHARDS"  # (shown as zstd; level 1)

log "tar of the dataset (not timed)"
tar -C "$WORK" -cf "$WORK/data.tar" data
TAR_BYTES=$(stat -c %s "$WORK/data.tar")
t0=$(now)
code=$(curl -sS -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:$AWS_REGION:s3" \
	--user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" \
	-T "$WORK/data.tar" "$AWS_ENDPOINT_URL/$CKSTREAM_S3_BUCKET/curl/data.tar")
t1=$(now)
[[ $code == 200 ]] || die "curl PUT answered $code"
WALL[curl]=$(dsec "$t1" "$t0")
log "curl single PUT: ${WALL[curl]} s"
t0=$(now)
$AWS s3 cp --quiet "$WORK/data.tar" "$B/awscli/data.tar"
t1=$(now)
WALL[awscli]=$(dsec "$t1" "$t0")
log "aws s3 cp: ${WALL[awscli]} s"
$AWS s3 rm --quiet "$B/curl/data.tar"
$AWS s3 rm --quiet "$B/awscli/data.tar"
rm -f "$WORK/data.tar"

# ---- (b) ls and cat ----
declare -A REQ GOT INDEX
for name in pack-none-1 pack-zstd-$SHARDS; do
	CKSTREAM_S3_STATS=1 "$CKSTREAM" ls "$B/$name.cka" >/dev/null 2>"$WORK/ls.err"
	REQ[$name-ls]=$(stats "$WORK/ls.err" | jq .get_requests)
	GOT[$name-ls]=$(stats "$WORK/ls.err" | jq .get_bytes)
	CKSTREAM_S3_STATS=1 "$CKSTREAM" cat "$B/$name.cka" data/one-mib >"$WORK/one-mib.out" 2>"$WORK/cat.err"
	cmp -s "$WORK/one-mib.out" "$WORK/data/one-mib" || die "cat returned other bytes"
	REQ[$name-cat]=$(stats "$WORK/cat.err" | jq .get_requests)
	GOT[$name-cat]=$(stats "$WORK/cat.err" | jq .get_bytes)
	INDEX[$name]=$(jq .index_bytes "$WORK/$name.json")
	log "$name: ls ${REQ[$name-ls]} requests ${GOT[$name-ls]} B; cat 1 MiB ${REQ[$name-cat]} requests ${GOT[$name-cat]} B (index ${INDEX[$name]} B)"
done
# Download first, for comparison: every shard object whole.
t0=$(now)
mkdir -p "$WORK/dl"
$AWS s3 cp --quiet --recursive --exclude '*' --include "pack-zstd-$SHARDS.cka*" "$B/" "$WORK/dl/"
t1=$(now)
WALL[download-zstd]=$(dsec "$t1" "$t0")
CKSTREAM_S3_STATS=0 "$CKSTREAM" cat "$WORK/dl/pack-zstd-$SHARDS.cka" data/one-mib | cmp -s - "$WORK/data/one-mib" \
	|| die "downloaded archive differs"
rm -rf "$WORK/dl"
for name in pack-none-1 pack-none-$SHARDS pack-zstd-$SHARDS; do
	$AWS s3 rm --quiet --recursive --exclude '*' --include "$name.cka*" "$B/"
done

# ---- (c) CRIU: restore from S3 vs download then restore ----
CRIU_ROWS=""
if [[ -z ${SKIP_CRIU:-} ]]; then
	[[ $(id -u) == 0 ]] || die "must run as root (criu); SKIP_CRIU=1 skips part (c)"
	build_memtest "$WORK"
	HB=$WORK/hb
	log "starting memtest $MIB MiB (MEMTEST_FILL=mixed)"
	MEMTEST_FILL=mixed start_memtest "$MIB" "$HB"
	dump_s3() { # name
		local t0 t1
		t0=$(now)
		"$CKSTREAM" dump -q --json --pid "$MT_PID" -c zstd:1 --shards "$SHARDS" -o "$B/$1.cka" \
			--work-dir "$WORK/wd-$1" >"$WORK/$1.dump.json"
		t1=$(now)
		WALL[$1-dump]=$(dsec "$t1" "$t0")
		wait_gone
	}
	# CPU-seconds the server process has used (utime + stime): the restores' CPU budget.
	server_cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$(cat "$CKSTREAM_S3_DIR/pid")/stat"; }
	dump_s3 criu-a
	ARCHIVE_BYTES=$("$CKSTREAM" info --json "$B/criu-a.cka" | jq .archive_bytes)
	log "dump to S3: ${WALL[criu-a-dump]} s, $ARCHIVE_BYTES bytes"
	c0=$(server_cpu)
	t0=$(now)
	CKSTREAM_S3_STATS=1 "$CKSTREAM" restore -q --json "$B/criu-a.cka" --work-dir "$WORK/wd-ra" \
		>"$WORK/restore-s3.json" 2>"$WORK/restore-s3.err"
	t1=$(now)
	WALL[restore-s3]=$(dsec "$t1" "$t0")
	SERVER_CPU_S3=$(dsec "$(server_cpu)" "$c0")
	CK_CPU_S3=$(jq '.rusage.self_cpu_seconds * 100 | round / 100' "$WORK/restore-s3.json")
	RSS_S3=$(jq .rusage.self_max_rss_kib "$WORK/restore-s3.json")
	GOT_S3=$(stats "$WORK/restore-s3.err" | jq .get_bytes)
	REQ_S3=$(stats "$WORK/restore-s3.err" | jq .get_requests)
	verify_restored "restore from S3" "$HB"
	log "restore from S3: ${WALL[restore-s3]} s, peak RSS $RSS_S3 KiB, $REQ_S3 GETs, $GOT_S3 bytes"

	dump_s3 criu-b
	c0=$(server_cpu)
	t0=$(now)
	mkdir -p "$WORK/dl"
	$AWS s3 cp --quiet --recursive --exclude '*' --include "criu-b.cka*" "$B/" "$WORK/dl/"
	t1=$(now)
	SERVER_CPU_DL=$(dsec "$(server_cpu)" "$c0")
	WALL[download-criu]=$(dsec "$t1" "$t0")
	"$CKSTREAM" restore -q --json "$WORK/dl/criu-b.cka" --work-dir "$WORK/wd-rb" >"$WORK/restore-local.json"
	t2=$(now)
	WALL[restore-local]=$(dsec "$t2" "$t1")
	WALL[download-restore]=$(dsec "$t2" "$t0")
	RSS_LOCAL=$(jq .rusage.self_max_rss_kib "$WORK/restore-local.json")
	CK_CPU_LOCAL=$(jq '.rusage.self_cpu_seconds * 100 | round / 100' "$WORK/restore-local.json")
	verify_restored "download then restore" "$HB"
	rm -rf "$WORK/dl"
	log "download ${WALL[download-criu]} s + restore ${WALL[restore-local]} s = ${WALL[download-restore]} s, peak RSS $RSS_LOCAL KiB"
	kill_memtest
	CRIU_ROWS="
## (c) Restore of a live ${MIB} MiB process (MEMTEST_FILL=mixed), zstd:1, $SHARDS shards, $ARCHIVE_BYTES bytes

| | wall s | ckstream peak RSS | ckstream CPU s | S3 server CPU s |
|---|---|---|---|---|
| \`ckstream dump\` to s3:// | ${WALL[criu-a-dump]} | | | |
| \`ckstream restore s3://...\` (streaming) | ${WALL[restore-s3]} | $((RSS_S3 / 1024)) MiB | $CK_CPU_S3 | $SERVER_CPU_S3 |
| download (\`aws s3 cp --recursive\`) then \`ckstream restore\` | ${WALL[download-restore]} (${WALL[download-criu]} + ${WALL[restore-local]}) | $((RSS_LOCAL / 1024)) MiB | $CK_CPU_LOCAL | $SERVER_CPU_DL |

The machine has $(nproc) cores; client, S3 server and CRIU share them.

Restore from S3 / download-then-restore wall: **$(ratio "${WALL[restore-s3]}" "${WALL[download-restore]}")** (target <= 0.7).
The streaming restore made $REQ_S3 GET requests for $GOT_S3 bytes ($(ratio "$GOT_S3" "$ARCHIVE_BYTES") x the archive).
"
fi

# ---- report ----
{
	echo "# s3-bench $STAMP (ckstream $CK_REV)"
	echo
	echo "SeaweedFS $("$VENV/bin/weed" version 2>/dev/null | head -1 | awk '{print $3}') on 127.0.0.1 (same 2-core machine as the client), dataset $DATA_BYTES bytes in /dev/shm."
	echo "Load average at the end: $(loadavg)."
	echo
	echo "## (a) Upload"
	echo
	echo "| | wall s | MB/s of data | stored bytes |"
	echo "|---|---|---|---|"
	for n in pack-none-1 pack-none-$SHARDS pack-zstd-$SHARDS; do
		local_codec=${n#pack-}
		echo "| \`ckstream pack -c ${local_codec%-*} --shards ${local_codec##*-}\` to s3:// | ${WALL[$n]} | $(mb_s "$DATA_BYTES" "${WALL[$n]}") | ${BYTES[$n]} |"
	done
	echo "| single-stream PUT of a tar (\`curl -T\`, SigV4) | ${WALL[curl]} | $(mb_s "$DATA_BYTES" "${WALL[curl]}") | $TAR_BYTES |"
	echo "| \`aws s3 cp\` of the tar (multipart, 10 threads) | ${WALL[awscli]} | $(mb_s "$DATA_BYTES" "${WALL[awscli]}") | $TAR_BYTES |"
	echo
	echo "Ratios (wall): single-stream / ckstream $SHARDS shards = **$(ratio "${WALL[curl]}" "${WALL[pack-none-$SHARDS]}")**; ckstream 1 shard / $SHARDS shards = **$(ratio "${WALL[pack-none-1]}" "${WALL[pack-none-$SHARDS]}")**; aws s3 cp / ckstream $SHARDS shards = **$(ratio "${WALL[awscli]}" "${WALL[pack-none-$SHARDS]}")**."
	echo
	echo "## (b) ls and cat of a 1 MiB file from the remote archive"
	echo
	echo "| archive | ls GETs | ls bytes | cat GETs | cat bytes | index bytes | archive bytes | cat bytes / archive |"
	echo "|---|---|---|---|---|---|---|---|"
	for n in pack-none-1 pack-zstd-$SHARDS; do
		echo "| ${n#pack-} | ${REQ[$n-ls]} | ${GOT[$n-ls]} | ${REQ[$n-cat]} | ${GOT[$n-cat]} | ${INDEX[$n]} | ${BYTES[$n]} | $(awk -v a="${GOT[$n-cat]}" -v b="${BYTES[$n]}" 'BEGIN{printf "%.5f", a/b}') |"
	done
	echo
	echo "Downloading the whole zstd archive first (\`aws s3 cp --recursive\`) moves ${BYTES[pack-zstd-$SHARDS]} bytes in ${WALL[download-zstd]} s."
	echo "$CRIU_ROWS"
	echo "Command: \`GIB=$GIB MIB=$MIB SHARDS=$SHARDS bench/s3-bench.sh\`"
} | tee "$REPORT"
log "report: $REPORT"

#!/usr/bin/env bash
# bench/capture-bench.sh — ckstream as a criu-image-streamer drop-in, side by side with
# the real criu-image-streamer, in the streamer README's own pipelines:
#   capture:  TOOL --images-dir D capture | cat > IMG   while  criu dump --stream -D D
#   restore:  cat IMG | TOOL --images-dir D serve        while  criu restore --stream -D D
# A memtest process (MIB of MEMTEST_FILL memory) is dumped and restored REPS times per
# tool, tools interleaved; every restore re-checks the whole memory (verify=ok or the run
# dies) and every ckstream archive passes `ckstream verify`. Reports per step: criu wall,
# the streamer's user+sys CPU and peak RSS (GNU time), and ratios ckstream / streamer.
#
# criu-image-streamer is not packaged: build it from its published source
# (github.com/checkpoint-restore/criu-image-streamer, `cargo build --release`, needs
# protoc) and point CIS at the binary. Without it only ckstream runs, and the report
# says so.
#
# Env: MIB (1024) REPS (3) MEMTEST_FILL (random) DIR (/dev/shm/ckstream-capture-bench)
#      CIS (/var/tmp/criu-image-streamer) CRIU (/usr/local/sbin/criu) NO_BUILD CKSTREAM
#      CKSTREAM_BASE (an older ckstream binary to run as a third tool, "ck-base")
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MIB=${MIB:-1024}
REPS=${REPS:-3}
export MEMTEST_FILL=${MEMTEST_FILL:-random}
DIR=${DIR:-/dev/shm/ckstream-capture-bench}
CIS=${CIS:-/var/tmp/criu-image-streamer}
CRIU=${CRIU:-/usr/local/sbin/criu}

need_ckstream
need_tools "$CRIU" /usr/bin/time gcc
TOOLS=(ck)
if [[ -x $CIS ]]; then TOOLS=(cis ck); else log "no criu-image-streamer at $CIS: ckstream only"; fi
if [[ -n ${CKSTREAM_BASE:-} ]]; then TOOLS+=(ck-base); fi
rm -rf "$DIR"
mkdir -p "$DIR"
on_exit 'kill_memtest; rm -rf "$DIR"'
build_memtest "$DIR"
# The binary under test is copied, so a rebuild during the run cannot change it.
cp "$CKSTREAM" "$DIR/ckstream"
[[ -n ${CKSTREAM_BASE:-} ]] && cp "$CKSTREAM_BASE" "$DIR/ckstream-base"
printf 'tool\trep\tdump_wall\tcapture_cpu\tcapture_rss_kib\timage_bytes\trestore_wall\trestore_e2e\tserve_cpu\tserve_rss_kib\n' >"$TSV"

# run_tool TOOL REP: one capture and one restore through TOOL; appends a TSV row.
run_tool() {
	local tool=$1 rep=$2 bin img=$DIR/img hb=$DIR/hb t0 t1 ts dump_wall restore_wall restore_e2e
	local cap_cpu cap_rss srv_cpu srv_rss size
	case $tool in
	cis) bin=$CIS ;;
	ck-base) bin=$DIR/ckstream-base ;;
	*) bin=$DIR/ckstream ;;
	esac
	rm -rf "$DIR/images" "$img"
	mkdir -p "$DIR/images"
	start_memtest "$MIB" "$hb"
	/usr/bin/time -o "$DIR/cap.time" -f '%U %S %M' "$bin" --images-dir "$DIR/images" capture 2>"$DIR/cap.err" | cat >"$img" &
	local cap=$!
	for _ in $(seq 200); do [[ -S $DIR/images/streamer-capture.sock ]] && break; sleep 0.05; done
	t0=$(now)
	"$CRIU" dump --stream -D "$DIR/images" -t "$MT_PID" -o dump.log || die "$tool: criu dump failed"
	t1=$(now)
	wait "$cap" || die "$tool: capture failed: $(cat "$DIR/cap.err")"
	wait_gone
	dump_wall=$(fsub "$t1" "$t0")
	read -r u s cap_rss <"$DIR/cap.time"
	cap_cpu=$(awk -v u="$u" -v s="$s" 'BEGIN{printf "%.2f", u+s}')
	size=$(stat -c %s "$img")
	if [[ $tool == ck* ]]; then
		"$DIR/ckstream" verify "$img" >/dev/null || die "ckstream verify failed on the captured archive"
	fi
	rm -f "$DIR/images"/*.sock
	# Both read the whole stream before they open their socket (criu-image-streamer into
	# memory, ckstream into an unlinked spool file: its footer comes last), and the wall
	# from the socket leaves that out: the wall from the start of `cat` is reported too.
	ts=$(now)
	cat "$img" | /usr/bin/time -o "$DIR/srv.time" -f '%U %S %M' "$bin" --images-dir "$DIR/images" serve 2>"$DIR/srv.err" &
	local srv=$!
	for _ in $(seq 600); do [[ -S $DIR/images/streamer-serve.sock ]] && break; sleep 0.05; done
	t0=$(now)
	"$CRIU" restore --stream -D "$DIR/images" -d -o restore.log || die "$tool: criu restore failed"
	t1=$(now)
	wait "$srv" || die "$tool: serve failed: $(cat "$DIR/srv.err")"
	restore_wall=$(fsub "$t1" "$t0")
	restore_e2e=$(fsub "$t1" "$ts")
	read -r u s srv_rss <"$DIR/srv.time"
	srv_cpu=$(awk -v u="$u" -v s="$s" 'BEGIN{printf "%.2f", u+s}')
	verify_restored "$tool rep $rep" "$hb"
	kill_memtest
	log "$tool rep $rep: dump $dump_wall s, capture CPU $cap_cpu s, restore $restore_wall s ($restore_e2e s from cat), serve CPU $srv_cpu s"
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$rep" "$dump_wall" "$cap_cpu" "$cap_rss" \
		"$size" "$restore_wall" "$restore_e2e" "$srv_cpu" "$srv_rss" >>"$TSV"
}

for rep in $(seq "$REPS"); do
	for tool in "${TOOLS[@]}"; do run_tool "$tool" "$rep"; done
done

gb=$(awk -v m="$MIB" 'BEGIN{print m*1048576/1e9}')
med() { tsv_med "$TSV" "$2" tool="$1"; }
{
	echo "# capture-bench $STAMP"
	echo
	echo "ckstream $CK_REV; $MIB MiB memtest ($MEMTEST_FILL), $REPS reps, images on $DIR; load $(loadavg)."
	echo "criu-image-streamer: $([[ -x $CIS ]] && echo "$CIS" || echo "not available (compare with the numbers in issue 16)")."
	[[ -n ${CKSTREAM_BASE:-} ]] && echo "ck-base: $CKSTREAM_BASE ($("$CKSTREAM_BASE" --version 2>/dev/null || echo ?)), the same pipelines."
	echo "fs.pipe-max-size $(cat /proc/sys/fs/pipe-max-size). Medians; CPU is the streamer's own user+sys (GNU time)."
	echo
	echo "| tool | criu dump wall s | capture CPU s (CPU-s/GB) | capture peak RSS MiB | archive bytes | criu restore wall s (from the socket) | restore wall s (from \`cat\`) | serve CPU s | serve peak RSS MiB |"
	echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|"
	for tool in "${TOOLS[@]}"; do
		c=$(med "$tool" capture_cpu)
		printf '| %s | %s | %s (%s) | %s | %s | %s | %s | %s | %s |\n' "$tool" "$(f 2 "$(med "$tool" dump_wall)")" \
			"$(f 2 "$c")" "$(div "$c" "$gb")" "$(div "$(med "$tool" capture_rss_kib)" 1024 0)" \
			"$(f 0 "$(med "$tool" image_bytes)")" "$(f 2 "$(med "$tool" restore_wall)")" "$(f 2 "$(med "$tool" restore_e2e)")" \
			"$(f 2 "$(med "$tool" serve_cpu)")" "$(div "$(med "$tool" serve_rss_kib)" 1024 0)"
	done
	if [[ -x $CIS ]]; then
		echo
		echo "ckstream ÷ criu-image-streamer: dump wall $(div "$(med ck dump_wall)" "$(med cis dump_wall)")×," \
			"capture CPU $(div "$(med ck capture_cpu)" "$(med cis capture_cpu)")×," \
			"restore wall $(div "$(med ck restore_wall)" "$(med cis restore_wall)")× from the socket," \
			"$(div "$(med ck restore_e2e)" "$(med cis restore_e2e)")× from \`cat\`," \
			"serve RSS $(div "$(med ck serve_rss_kib)" "$(med cis serve_rss_kib)")×."
	fi
	echo
	echo "Every restore verified its memory (verify=ok); every ckstream archive passed \`ckstream verify\`. Per-run rows: \`$(basename "$TSV")\`."
} >"$REPORT"
cat "$REPORT"

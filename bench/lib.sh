# bench/lib.sh — what every bench/*.sh shares. Sourced, never run:
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# Sets REPO OUTDIR STAMP BENCH REPORT TSV (bench/out/<script>-<stamp>.{md,tsv}; a script
# writes the TSV only if it keeps one), `set -euo pipefail`, and the EXIT/INT/TERM traps
# that run the commands registered with on_exit.
# Env read here: NO_BUILD=1 (need_ckstream skips `cargo build`), CKSTREAM (binary).
# shellcheck shell=bash disable=SC2034
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$(basename "$0" .sh)
OUTDIR=$REPO/bench/out
STAMP=$(date +%Y%m%d-%H%M%S)
REPORT=$OUTDIR/$BENCH-$STAMP.md
TSV=$OUTDIR/$BENCH-$STAMP.tsv
CKSTREAM=${CKSTREAM:-$REPO/target/release/ckstream}
mkdir -p "$OUTDIR"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s.%N; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# ------------------------------------------------------------------ cleanup registry
# on_exit CMD...: run CMD (eval'd, so variables are read at exit time) when the script
# ends for any reason; commands run last-registered first, errors ignored.
_ON_EXIT=()
on_exit() { _ON_EXIT+=("$*"); }
cleanup() {
	local rc=$? i
	trap - EXIT INT TERM
	set +e
	for ((i = ${#_ON_EXIT[@]} - 1; i >= 0; i--)); do eval "${_ON_EXIT[i]}"; done
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# need_ckstream: `cargo build --release -q` unless NO_BUILD=1, check $CKSTREAM, set
# CK_REV (short git rev of the tree, +dirty if crates/ has uncommitted changes).
need_ckstream() {
	if [[ -z ${NO_BUILD:-} ]]; then
		log "cargo build --release"
		(cd "$REPO" && cargo build --release -q)
	fi
	[[ -x $CKSTREAM ]] || die "no ckstream binary at $CKSTREAM"
	CK_REV="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo ?)$(git -C "$REPO" diff --quiet HEAD -- crates 2>/dev/null || echo +dirty)"
}

# need_tools TOOL...: die unless every TOOL is on PATH (or an executable path).
need_tools() {
	local t
	for t in "$@"; do command -v "$t" >/dev/null || die "missing tool: $t"; done
}

# ------------------------------------------------------------------ numbers
# fsub A B [PRECISION=3]: A - B; empty if A or B is empty.
fsub() { if [[ -n ${1:-} && -n ${2:-} ]]; then awk -v a="$1" -v b="$2" -v p="${3:-3}" 'BEGIN{printf "%." p "f", a-b}'; fi; }
# f PRECISION VALUE: VALUE formatted, – if empty.
f() { [[ -n ${2:-} ]] && awk -v v="$2" -v p="$1" 'BEGIN{printf "%." p "f", v}' || printf '–'; }
# div A B [PRECISION=2]: A / B formatted, – if either is empty or B is 0.
div() { [[ -n ${1:-} && -n ${2:-} ]] && awk -v a="$1" -v b="$2" -v p="${3:-2}" 'BEGIN{ if (b == 0) print "–"; else printf "%." p "f", a/b}' || printf '–'; }
# mb_s BYTES SECONDS: MB/s (1e6), no decimals.
mb_s() { awk -v b="$1" -v s="$2" 'BEGIN{printf "%.0f", b/s/1e6}'; }
# tree_bytes DIR [FIND-TESTS...]: apparent bytes of the regular files below DIR.
tree_bytes() { local d=$1; shift; find "$d" -type f "$@" -printf '%s\n' | awk '{s+=$1} END {printf "%.0f\n", s}'; }
# used_bytes MOUNTPOINT: bytes df reports as used.
used_bytes() { df -B1 --output=used "$1" | tail -1 | tr -d ' '; }

# The one median, as an awk function of a space-separated list of numbers ("" if none;
# an odd count gives the middle value as written, an even one the mean of the two).
# Use it inside awk programs as "$AWK_MEDIAN"'...', or through median / tsv_med.
AWK_MEDIAN='function median(list,   n, a, i, j, t) {
	n = split(list, a, " ")
	if (n == 0) return ""
	for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > t + 0; j--) a[j + 1] = a[j]; a[j + 1] = t }
	return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}'
# median: of the numbers on stdin, one per line (prints nothing if there are none).
median() { awk "$AWK_MEDIAN"'{ l = l " " $1 } END { m = median(l); if (m != "") print m }'; }
# tsv_med FILE COLUMN [NAME=VALUE...]: median of the non-empty COLUMN values of the rows
# of a TSV with a header line whose NAME columns equal VALUE (values without spaces).
tsv_med() {
	local file=$1 col=$2
	shift 2
	awk -F'\t' -v col="$col" -v conds="$*" "$AWK_MEDIAN"'
		NR == 1 {
			for (i = 1; i <= NF; i++) idx[$i] = i
			nc = split(conds, cs, " ")
			for (k = 1; k <= nc; k++) { p = index(cs[k], "="); cn[k] = idx[substr(cs[k], 1, p - 1)]; cv[k] = substr(cs[k], p + 1) }
			c = idx[col]
			next
		}
		{ for (k = 1; k <= nc; k++) if ($cn[k] != cv[k]) next; if (c && $c != "") l = l " " $c }
		END { m = median(l); if (m != "") print m }' "$file"
}

# copy_dirs DEST DIR...: copy each existing DIR (absolute) to DEST/DIR, keeping metadata
# (cp -a --parents is buggy in coreutils 9.1).
copy_dirs() {
	local dest=$1 rel=() d
	shift
	for d in "$@"; do [[ -d $d ]] && rel+=("${d#/}"); done
	tar -C / -cf - "${rel[@]}" | tar -C "$dest" -xpf -
}

# ------------------------------------------------------------------ page cache
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# ------------------------------------------------------------------ memtest
# build_memtest DIR: compile tests/progs/memtest.c to DIR/memtest, set MEMTEST.
build_memtest() {
	MEMTEST=$1/memtest
	gcc -O2 -o "$MEMTEST" "$REPO/tests/progs/memtest.c"
}

# start_memtest [--via CMD] MIB HB [CHILDREN]: start $MEMTEST detached in its own session
# (through CMD, a command or function that runs its arguments, e.g. criu-bench's in_cg),
# wait until its heartbeat file HB appears (it fills its memory first), set MT_PID.
# MEMTEST_FILL comes from the environment.
MT_PID=""
start_memtest() {
	local via=() i
	if [[ $1 == --via ]]; then via=("$2"); shift 2; fi
	local mib=$1 hb=$2 children=("${@:3}")
	rm -f "$hb" "$hb".*
	"${via[@]}" setsid -f "$MEMTEST" "$mib" "$hb" "${children[@]}" </dev/null >/dev/null 2>&1
	for i in $(seq 1200); do [[ -s $hb ]] && break; sleep 0.1; done
	[[ -s $hb ]] || die "memtest did not become ready in 120 s"
	MT_PID=$(cat "$hb.pid")
}

# kill_memtest: SIGTERM the memtest tree (memtest stops its children), then SIGKILL
# whatever is left in its session, and wait until the PIDs are free. For on_exit too.
kill_memtest() {
	[[ -n $MT_PID ]] || return 0
	local p=$MT_PID i left
	MT_PID=""
	kill -TERM "$p" 2>/dev/null
	for i in $(seq 50); do pgrep -s "$p" >/dev/null || return 0; sleep 0.1; done
	left=$(pgrep -s "$p" || true)
	# shellcheck disable=SC2086 # one PID per word
	[[ -n $left ]] && kill -KILL $left 2>/dev/null
	for i in $(seq 50); do pgrep -s "$p" >/dev/null || return 0; sleep 0.1; done
}

# wait_gone: after a (killing) dump, wait until memtest's tree is gone (zombies still
# hold the PID).
wait_gone() {
	local i
	for i in $(seq 600); do
		if ! pgrep -s "$MT_PID" >/dev/null && [[ ! -e /proc/$MT_PID ]]; then return 0; fi
		sleep 0.05
	done
	die "process tree $MT_PID still present 30 s after the dump"
}

# verify_restored WHAT HB: after a restore, memtest (MT_PID, heartbeat file HB) must run,
# its heartbeat must advance and a full re-check (SIGUSR1) must say verify=ok; else die.
verify_restored() {
	local what=$1 hb=$2 hb0 hb1 i
	[[ -e /proc/$MT_PID ]] || die "$what: pid $MT_PID not running after restore"
	hb0=$(cat "$hb" 2>/dev/null || echo -1)
	rm -f "$hb.verify"
	kill -USR1 "$MT_PID"
	for i in $(seq 1800); do [[ -s $hb.verify ]] && break; sleep 0.1; done
	[[ -s $hb.verify ]] || die "$what: no $hb.verify 180 s after SIGUSR1"
	if [[ $(head -1 "$hb.verify") != verify=ok ]]; then
		cat "$hb.verify" >&2
		die "$what: MEMORY VERIFICATION FAILED: $(head -1 "$hb.verify")"
	fi
	for i in $(seq 50); do hb1=$(cat "$hb" 2>/dev/null || echo -1); ((hb1 > hb0)) && break; sleep 0.1; done
	((hb1 > hb0)) || die "$what: heartbeat stuck at $hb1 after restore"
}

# ------------------------------------------------------------------ CRIU
# criu_freeze STATS-DUMP: seconds the tree was frozen according to CRIU's own stats image:
# freezing_time + frozen_time (µs) of stats_entry.dump (images/stats.proto). The file is
# two magic words (IMG_SERVICE, STATS: criu/include/magic.h), a u32 LE length, the message.
criu_freeze() {
	python3 - "$1" <<'PY'
import struct, sys
IMG_SERVICE_MAGIC, STATS_MAGIC = 0x55105940, 0x57093306
def varint(b, i):
    v = s = 0
    while True:
        c = b[i]; i += 1; v |= (c & 0x7F) << s; s += 7
        if c < 0x80: return v, i
def fields(b):  # protobuf wire format: (field number, value) pairs
    i = 0
    while i < len(b):
        k, i = varint(b, i)
        t = k & 7
        if t == 0: v, i = varint(b, i)
        elif t == 2: n, i = varint(b, i); v = b[i:i + n]; i += n
        elif t == 1: v, i = b[i:i + 8], i + 8
        elif t == 5: v, i = b[i:i + 4], i + 4
        else: sys.exit("%s: unsupported wire type %d" % (sys.argv[1], t))
        yield k >> 3, v
data = open(sys.argv[1], "rb").read()
m0, m1, n = struct.unpack_from("<III", data)
if (m0, m1) != (IMG_SERVICE_MAGIC, STATS_MAGIC): sys.exit("%s: not a CRIU stats image" % sys.argv[1])
dump = dict(fields(dict(fields(data[12:12 + n]))[1]))  # stats_entry.dump = 1
print("%.6f" % ((dump[1] + dump[2]) / 1e6))  # freezing_time = 1, frozen_time = 2
PY
}

#!/usr/bin/env bash
# crypto.sh — what signed and encrypted archives cost (AES-256-GCM sealing of every
# payload and the index, Ed25519 signature over the index digest), against the same
# archives without them and against tar | zstd | openssl enc, side by side in one run.
#
# Keys are made for the run (`ckstream key generate`): a signer K, a recipient R, and a
# third key X only for the refusal checks. Tools (order rotates each rep):
#   ck-zstd       ckstream pack|dump -c zstd (= zstd:1)
#   ck-zstd-es    ... -c zstd --sign K --encrypt-to R.pub; read with --key R --trusted-key K.pub
#   ck-none       ... -c none
#   ck-none-e     ... -c none --encrypt-to R.pub; read with --key R
#   tar-zstd      tar -cf - | zstd -1 -T0                 (files only)
#   tar-zstd-enc  tar -cf - | zstd -1 -T0 | openssl enc -aes-256-ctr -pbkdf2 -pass file:PW
#                 (files only; openssl enc has no AEAD mode: confidentiality without
#                 integrity, which ckstream's sealing and signature add)
#   criu-tar-enc  processes only: `criu dump -D` into a directory on $SHM, then the
#                 tar-zstd-enc pipeline into the archive; restore: openssl enc -d | zstd -dc
#                 | tar -x into $SHM, `criu restore -D -d` (staging on tmpfs: its best case)
#
# (a) files: `pack` and `unpack` of a dataset (default: made once under $CACHE the way
#     s3-bench.sh makes its data, GIB/2 GiB of urandom and GIB/2 GiB of text lines in
#     64 MiB files plus a 1 MiB file; DATASET=DIR uses DIR instead, e.g. pack-bench's
#     $CACHE/dataset). Copied (untimed) into each place first. After the first unpack of
#     every tool: diff -r against the dataset; for ckstream also `verify` with the keys,
#     and an encrypted archive must be refused without --key, a signed one under another
#     --trusted-key, an unsigned one under any --trusted-key.
# (b) processes: a MIB MiB memtest (MEMTEST_FILL, default mixed), one per place, dumped
#     (killed) and restored over and over; memory verified after every restore (memtest
#     re-checks its buffer, heartbeat must advance: lib.sh verify_restored). Freeze = how
#     long the process was frozen, from CRIU's stats-dump (ckstream: JSON freeze_seconds;
#     the peer: parsed from its image dir).
#
# Places (WHERE): shm = a directory on $SHM (tmpfs: no sync, nothing to drop); disk = a
# directory under DISK_DIR (here ext4 on the virtio disk) where every step's time includes
# a `sync` after it (ckstream fsyncs its output, tar/zstd/openssl/criu do not) and the page
# cache is, per DISK_CACHES: cold = dropped before every step (sync; echo 3 >
# /proc/sys/vm/drop_caches), warm = the step's input read once before it. The process part
# on disk is cold only. CPU = user+sys of the step's whole command tree (/usr/bin/time; for
# a restore without the restored task). REPS runs, medians; ratios: encrypted ÷ its
# unencrypted twin (target for ck-zstd-es ÷ ck-zstd: ≤ 1.1) and ckstream ÷ the peer.
# Report: bench/out/crypto-<date>.md (and stdout); every step in bench/out/crypto-<date>.tsv.
#
# Env: REPS (3) WHERE ("shm disk") PARTS ("files criu") DISK_CACHES ("cold warm")
#      GIB (1) DATASET CACHE (/var/tmp/ckstream-bench) DISK_DIR (/var/tmp/ckstream-bench)
#      SHM (/dev/shm) MIB (1024) MEMTEST_FILL (mixed) TIMEOUT (600 s per step)
#      NO_BUILD=1 (skip cargo build) CKSTREAM CRIU

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPS=${REPS:-3}
WHERE=${WHERE:-"shm disk"}
PARTS=${PARTS:-"files criu"}
DISK_CACHES=${DISK_CACHES:-"cold warm"}
GIB=${GIB:-1}
CACHE=${CACHE:-/var/tmp/ckstream-bench}
DISK_DIR=${DISK_DIR:-/var/tmp/ckstream-bench}
SHM=${SHM:-/dev/shm}
MIB=${MIB:-1024}
export MEMTEST_FILL=${MEMTEST_FILL:-mixed}
TIMEOUT=${TIMEOUT:-600}
CRIU=${CRIU:-/usr/local/sbin/criu}
export CKSTREAM_CRIU=${CKSTREAM_CRIU:-$CRIU}
TIME=/usr/bin/time
# Every key is given explicitly below; a caller's keys must not turn plain runs into keyed ones.
unset CKSTREAM_KEY CKSTREAM_TRUSTED_KEYS

for w in $WHERE; do [[ $w == shm || $w == disk ]] || die "WHERE: '$w' is neither shm nor disk"; done
for p in $PARTS; do [[ $p == files || $p == criu ]] || die "PARTS: '$p' is neither files nor criu"; done
for c in $DISK_CACHES; do [[ $c == cold || $c == warm ]] || die "DISK_CACHES: '$c' is neither cold nor warm"; done
[[ $GIB =~ ^[1-9][0-9]*$ ]] || die "GIB must be a whole number of GiB"
part() { [[ " $PARTS " == *" $1 "* ]]; }
where() { [[ " $WHERE " == *" $1 "* ]]; }

FILE_TOOLS=(ck-zstd ck-zstd-es ck-none ck-none-e tar-zstd tar-zstd-enc)
CRIU_TOOLS=(ck-zstd ck-zstd-es ck-none ck-none-e criu-tar-enc)
# shellcheck disable=SC2016 # backquotes for markdown
declare -A LABEL=(
	[ck-zstd]='`ckstream -c zstd`'
	[ck-zstd-es]='`ckstream -c zstd --sign --encrypt-to`'
	[ck-none]='`ckstream -c none`'
	[ck-none-e]='`ckstream -c none --encrypt-to`'
	[tar-zstd]='`tar \| zstd -1 -T0`'
	[tar-zstd-enc]='`tar \| zstd -1 -T0 \| openssl enc -aes-256-ctr`'
	[criu-tar-enc]='`criu dump -D` (tmpfs) + `tar \| zstd -1 -T0 \| openssl enc`'
)
# TWIN: the same tool without encryption; PEER: what the row is compared with.
declare -A TWIN=([ck-zstd-es]=ck-zstd [ck-none-e]=ck-none [tar-zstd-enc]=tar-zstd)
declare -A PEER=([ck-zstd]=tar-zstd [ck-zstd-es]=tar-zstd-enc)
declare -A CRIU_PEER=([ck-zstd-es]=criu-tar-enc [ck-zstd]=criu-tar-enc)

WORK="" DIRS=()
# shellcheck disable=SC2016 # expanded at exit
on_exit 'rm -rf "$WORK" "${DIRS[@]}"'
on_exit kill_memtest

[[ $(id -u) == 0 ]] || die "must run as root (criu, drop_caches)"
need_tools zstd tar jq openssl gcc python3 timeout "$TIME"
part criu && need_tools "$CRIU"
need_ckstream
LOAD_START=$(loadavg)
log "load average at start: $LOAD_START"
WORK=$(mktemp -d "$SHM/crypto.XXXXXX")   # keys, logs, the peer's CRIU images
K=$WORK/signer R=$WORK/recipient X=$WORK/other PW=$WORK/passphrase IMG=$WORK/img
for k in "$K" "$R" "$X"; do "$CKSTREAM" -q key generate -o "$k"; done
head -c 32 /dev/urandom | base64 >"$PW"
ENC="openssl enc -aes-256-ctr -pbkdf2 -pass file:$PW"

TSV_COLS="part where cache op tool rep wall sync time cpu freeze out_bytes in_bytes load1"
echo "$TSV_COLS" | tr ' ' '\t' >"$TSV"
row() { printf '%s\n' "$@" "$(cut -d' ' -f1 /proc/loadavg)" | paste -sd'\t' >>"$TSV"; }

show_fail() { # file...
	local f
	for f in "$@"; do [[ -s $f ]] && { log "--- tail $f"; tail -20 "$f" >&2; }; done
	return 0
}

# Flags that make a ckstream writer (W) or reader (R) of TOOL, quoted for bash -c.
ck_flags() {
	case $1/$2 in
	W/ck-zstd) echo "-c zstd" ;;
	W/ck-zstd-es) echo "-c zstd --sign '$K' --encrypt-to '$R.pub'" ;;
	W/ck-none) echo "-c none" ;;
	W/ck-none-e) echo "-c none --encrypt-to '$R.pub'" ;;
	R/ck-zstd-es) echo "--key '$R' --trusted-key '$K.pub'" ;;
	R/ck-none-e) echo "--key '$R'" ;;
	R/*) echo "" ;;
	*) die "no ckstream flags for $1/$2" ;;
	esac
}

# place_dir WHERE: a new directory for one place in PLACE (removed at exit).
place_dir() {
	local d
	case $1 in
	shm) d=$SHM/crypto-place.$$ ;;
	disk)
		mkdir -p "$DISK_DIR"
		d=$DISK_DIR/crypto.$$
		[[ $(fs_of "$DISK_DIR") == *tmpfs* ]] && log "warning: $DISK_DIR is on tmpfs, not a real disk"
		;;
	esac
	rm -rf "$d"; mkdir -p "$d"; DIRS+=("$d")
	PLACE=$d
}
fs_of() { df --output=source,fstype "$1" | tail -1 | tr -s ' '; }

# run_step WHERE OP TOOL REP CMD: run CMD (bash -c, under /usr/bin/time and timeout), on
# disk then a timed `sync`; sets S_WALL S_SYNC S_TIME (wall + sync) S_CPU.
run_step() {
	local where=$1 op=$2 tool=$3 rep=$4 cmd=$5 tf=$WORK/time.out t0 t1 t2
	t0=$(now)
	if ! timeout "$TIMEOUT" "$TIME" -f '%U %S' -o "$tf" bash -c "$cmd" 2>"$WORK/step.err"; then
		show_fail "$WORK/step.err" "$WORK/wd/dump.log" "$WORK/wd/restore.log" "$IMG/dump.log" "$IMG/restore.log"
		die "$where $op $tool rep $rep failed: $cmd"
	fi
	t1=$(now)
	S_SYNC=""
	if [[ $where == disk ]]; then sync; t2=$(now); S_SYNC=$(fsub "$t2" "$t1"); fi
	S_WALL=$(fsub "$t1" "$t0")
	S_TIME=$(awk -v w="$S_WALL" -v s="${S_SYNC:-0}" 'BEGIN {printf "%.3f", w + s}')
	S_CPU=$(awk 'END {printf "%.2f", $1 + $2}' "$tf")
}

# record PART WHERE CACHE OP TOOL REP FREEZE OUT_BYTES IN_BYTES: the TSV row of the last run_step.
record() {
	row "$1" "$2" "$3" "$4" "$5" "$6" "$S_WALL" "$S_SYNC" "$S_TIME" "$S_CPU" "$7" "$8" "$9"
	log "  $2/$3 $4 $5 rep $6: ${S_TIME}s${S_SYNC:+ (sync ${S_SYNC}s)} cpu ${S_CPU}s${7:+ freeze ${7}s}${8:+ -> $8 B}"
}

# must_fail WHAT CMD...: CMD must fail (a refusal check); recorded in CHECKS.
CHECKS=()
must_fail() {
	local what=$1
	shift
	if "$@" >/dev/null 2>"$WORK/refusal.err"; then die "not refused: $what"; fi
	CHECKS+=("refused as it should: $what (\`$(head -1 "$WORK/refusal.err" | cut -c1-160)\`)")
}

# ------------------------------------------------------------------ dataset
DS_NOTE=""
if part files; then
	if [[ -n ${DATASET:-} ]]; then
		[[ -d $DATASET ]] || die "DATASET $DATASET is not a directory"
		DS_NOTE="DATASET=$DATASET"
	else
		DATASET=$CACHE/crypto-dataset-${GIB}g
		if [[ ! -d $DATASET ]]; then
			log "dataset: making $DATASET (${GIB} GiB, half urandom, half text lines)"
			tmp=$DATASET.tmp n=$((GIB * 512 / 64))
			rm -rf "$tmp"; mkdir -p "$tmp/random" "$tmp/text"
			# shellcheck disable=SC2016 # expanded at exit
			on_exit 'rm -rf "$tmp"'
			for ((i = 0; i < n; i++)); do head -c 64M /dev/urandom >"$tmp/random/r$i"; done
			for ((i = 0; i < n; i++)); do
				{ seq -f "line %.0f of a text log with some repeated words in it" $((i * 1200000)) $(((i + 1) * 1200000)) ||
					true; } | head -c 64M >"$tmp/text/t$i"
			done
			head -c 1M /dev/urandom >"$tmp/one-mib"
			mv "$tmp" "$DATASET"
		else
			log "dataset: reusing $DATASET"
		fi
		DS_NOTE="generated (as s3-bench.sh does): $((GIB * 512)) MiB of /dev/urandom and $((GIB * 512)) MiB of \`seq\` text lines in 64 MiB files, plus a 1 MiB random file"
	fi
	DS_BYTES=$(tree_bytes "$DATASET")
	DS_FILES=$(find "$DATASET" -type f | wc -l)
	DS_Z1=$(tar -C "$DATASET" -cf - . | zstd -1 -T0 -q -c | wc -c)
	log "dataset: $DS_BYTES B in $DS_FILES files, tar | zstd -1: $DS_Z1 B"
fi

# ------------------------------------------------------------------ (a) files
pack_cmd() { # TOOL DATA OUT
	case $1 in
	ck-*) echo "'$CKSTREAM' pack -q $(ck_flags W "$1") -o '$3' .='$2'" ;;
	tar-zstd) echo "tar -C '$2' -cf - . | zstd -1 -T0 -q -c >'$3'" ;;
	tar-zstd-enc) echo "tar -C '$2' -cf - . | zstd -1 -T0 -q -c | $ENC -out '$3'" ;;
	esac
}
unpack_cmd() { # TOOL ARCHIVE OUTDIR (OUTDIR exists, empty)
	case $1 in
	ck-*) echo "'$CKSTREAM' $(ck_flags R "$1") unpack -q '$2' -C '$3'" ;;
	tar-zstd) echo "zstd -dc -q '$2' | tar -C '$3' -xf -" ;;
	tar-zstd-enc) echo "$ENC -d -in '$2' | zstd -dc -q | tar -C '$3' -xf -" ;;
	esac
}
arch_of() { # DIR TOOL
	case $2 in ck-*) echo "$1/$2.cka" ;; tar-zstd) echo "$1/$2.tar.zst" ;; tar-zstd-enc) echo "$1/$2.tar.zst.enc" ;; esac
}

# prep WHERE CACHE PATH...: make the page cache what CACHE says before a timed step.
prep() {
	local where=$1 cache=$2
	shift 2
	[[ $where == disk ]] || return 0
	if [[ $cache == cold ]]; then
		drop_caches
	else
		sync
		tar -P -cf - "$@" | cat >/dev/null
	fi
}

# check_unpacked TOOL ARCHIVE OUTDIR DATA: correctness after the first unpack (untimed).
check_unpacked() {
	local tool=$1 a=$2 o=$3 d=$4 rd info
	diff -r --no-dereference -q "$d" "$o" >/dev/null || die "$tool: unpacked tree differs from the dataset"
	if [[ $tool == ck-* ]]; then
		rd=$(ck_flags R "$tool")
		eval "\"\$CKSTREAM\" -q $rd verify '$a'" || die "$tool: ckstream verify failed"
		CHECKS+=("$tool: \`ckstream verify\`${rd:+ with the keys} ok, unpacked tree identical (diff -r)")
	else
		CHECKS+=("$tool: unpacked tree identical (diff -r)")
	fi
	case $tool in
	ck-zstd-es)
		must_fail "signed+encrypted archive without --key" "$CKSTREAM" -q info "$a"
		must_fail "signed+encrypted archive under another --trusted-key" \
			"$CKSTREAM" -q --key "$R" --trusted-key "$X.pub" info "$a"
		must_fail "signed+encrypted archive with only another secret key" "$CKSTREAM" -q --key "$X" info "$a"
		# (into a variable first: `info | grep -q` would close the pipe under ckstream)
		info=$("$CKSTREAM" -q --key "$R" --trusted-key "$K.pub" info "$a")
		grep -q '^encryption: *encrypted' <<<"$info" || die "$tool: info does not say encrypted"
		grep -q "^signature: .*$("$CKSTREAM" -q key id "$K.pub")" <<<"$info" || die "$tool: info does not name the signer"
		CHECKS+=("$tool: \`ckstream info\` says \`$(grep '^encryption:' <<<"$info" | tr -s ' ')\`, \`$(grep '^signature:' <<<"$info" | tr -s ' ')\`")
		;;
	ck-none-e)
		must_fail "encrypted archive without --key" "$CKSTREAM" -q info "$a"
		must_fail "unsigned encrypted archive under --trusted-key" "$CKSTREAM" -q --key "$R" --trusted-key "$K.pub" info "$a"
		;;
	esac
}

files_bench() {
	local where=$1 dir data a o cache rep k tool n=${#FILE_TOOLS[@]} arch
	place_dir "$where"
	dir=$PLACE
	data=$dir/data a=$dir/arch o=$dir/out
	log "[$where] files in $dir ($(fs_of "$dir")): copying the dataset (untimed)"
	cp -a "$DATASET" "$data"
	mkdir -p "$a"
	local caches=warm
	[[ $where == disk ]] && caches=$DISK_CACHES
	for cache in $caches; do
		for ((rep = 1; rep <= REPS; rep++)); do
			for ((k = 0; k < n; k++)); do
				tool=${FILE_TOOLS[$(((k + rep - 1) % n))]}
				arch=$(arch_of "$a" "$tool")
				rm -f "$arch"
				prep "$where" "$cache" "$data"
				run_step "$where" pack "$tool" "$rep" "$(pack_cmd "$tool" "$data" "$arch")"
				record files "$where" "$cache" pack "$tool" "$rep" "" "$(stat -c %s "$arch")" "$DS_BYTES"
			done
		done
		for ((rep = 1; rep <= REPS; rep++)); do
			for ((k = 0; k < n; k++)); do
				tool=${FILE_TOOLS[$(((k + rep - 1) % n))]}
				arch=$(arch_of "$a" "$tool")
				rm -rf "$o"; mkdir "$o"
				prep "$where" "$cache" "$arch"
				run_step "$where" unpack "$tool" "$rep" "$(unpack_cmd "$tool" "$arch" "$o")"
				record files "$where" "$cache" unpack "$tool" "$rep" "" "$(tree_bytes "$o")" "$(stat -c %s "$arch")"
				if [[ $rep == 1 && $where == "${WHERE%% *}" && $cache == "${caches%% *}" ]]; then
					check_unpacked "$tool" "$arch" "$o" "$data"
				fi
			done
		done
	done
	rm -rf "$dir"
}

# ------------------------------------------------------------------ (b) processes
# criu_freeze: bench/lib.sh.

dump_cmd() { # TOOL ARCHIVE
	case $1 in
	ck-*) echo "'$CKSTREAM' dump --pid $MT_PID -o '$2' $(ck_flags W "$1") -q --json --work-dir '$WORK/wd' >'$WORK/dump.json'" ;;
	criu-tar-enc) echo "'$CRIU' dump -t $MT_PID -D '$IMG' -o dump.log -v4 && tar -C '$IMG' -cf - . | zstd -1 -T0 -q -c | $ENC -out '$2'" ;;
	esac
}
restore_cmd() { # TOOL ARCHIVE
	case $1 in
	ck-*) echo "'$CKSTREAM' $(ck_flags R "$1") restore '$2' -q --json --work-dir '$WORK/wd' >'$WORK/restore.json'" ;;
	criu-tar-enc) echo "$ENC -d -in '$2' | zstd -dc -q | tar -C '$IMG' -xf - && '$CRIU' restore -D '$IMG' -d -o restore.log -v4" ;;
	esac
}

criu_bench() {
	local where=$1 dir rep k tool n=${#CRIU_TOOLS[@]} arch cache=warm ib fr
	[[ $where == disk ]] && cache=cold
	place_dir "$where"
	dir=$PLACE
	log "[$where] processes: archives in $dir ($(fs_of "$dir")); memtest $MIB MiB (MEMTEST_FILL=$MEMTEST_FILL)"
	start_memtest "$MIB" "$WORK/hb"
	for ((rep = 1; rep <= REPS; rep++)); do
		for ((k = 0; k < n; k++)); do
			tool=${CRIU_TOOLS[$(((k + rep - 1) % n))]}
			case $tool in ck-*) arch=$dir/$tool.cka ;; *) arch=$dir/$tool.tar.zst.enc ;; esac
			rm -rf "$arch" "$IMG" "$WORK/wd"; mkdir -p "$IMG" "$WORK/wd"
			[[ $cache == cold ]] && drop_caches
			run_step "$where" dump "$tool" "$rep" "$(dump_cmd "$tool" "$arch")"
			if [[ $tool == ck-* ]]; then
				fr=$(jq -r '.freeze_seconds // .seconds_since_freeze' "$WORK/dump.json")
				ib=$(jq -r .image_bytes "$WORK/dump.json")
			else
				fr=$(criu_freeze "$IMG/stats-dump")
				ib=$(tree_bytes "$IMG" -name '*.img')
			fi
			record criu "$where" "$cache" dump "$tool" "$rep" "$fr" "$(stat -c %s "$arch")" "$ib"
			rm -rf "$IMG" "$WORK/wd"; mkdir -p "$IMG" "$WORK/wd"
			wait_gone
			[[ $cache == cold ]] && drop_caches
			run_step "$where" restore "$tool" "$rep" "$(restore_cmd "$tool" "$arch")"
			record criu "$where" "$cache" restore "$tool" "$rep" "" "$ib" "$(stat -c %s "$arch")"
			verify_restored "$where $tool rep $rep" "$WORK/hb"
			rm -rf "$arch" "$IMG"
		done
	done
	kill_memtest
	rm -rf "$dir"
}

# ------------------------------------------------------------------ run
T_START=$(now)
for w in $WHERE; do
	if part files; then files_bench "$w"; fi
done
if part criu; then
	build_memtest "$WORK"
	for w in $WHERE; do criu_bench "$w"; done
fi
T_TOTAL=$(fsub "$(now)" "$T_START" 0)
LOAD_END=$(loadavg)
log "load average at end: $LOAD_END; ${T_TOTAL}s"

# ------------------------------------------------------------------ report
med() { tsv_med "$TSV" "$@"; }
ratio() { local r; r=$(div "$1" "$2"); [[ $r == – ]] && printf '–' || printf '%s×' "$r"; }
# n0 VALUE: a whole number with thousands separators, – if empty.
n0() { local v; v=$(f 0 "${1:-}"); if [[ $v == – ]]; then printf '–'; else sed ':a;s/\B[0-9]\{3\}\>/,&/;ta' <<<"$v" | tr -d '\n'; fi; }
place() { if [[ $1 == shm ]]; then echo "tmpfs"; else echo "disk"; fi; }
caches_of() { if [[ $1 == shm ]]; then echo warm; else echo "$DISK_CACHES"; fi; }
TARGETS=()

files_report() {
	local w c op tool t cpu ob tw pr
	echo "## (a) Files: \`pack\` / \`unpack\` of $(f 2 "$(awk -v b="$DS_BYTES" 'BEGIN {print b / 1073741824}')") GiB"
	echo
	echo "Dataset: $DS_NOTE; $(n0 "$DS_BYTES") B in $DS_FILES files (\`tar | zstd -1\` ratio $(div "$DS_BYTES" "$DS_Z1"))."
	echo "time = wall (tmpfs) or wall + the \`sync\` after it (disk); MB/s = dataset bytes ÷ time; CPU = user+sys of the command tree."
	echo "÷ unencrypted = against the same tool without encryption (zstd+sign+encrypt ÷ zstd, none+encrypt ÷ none, the openssl pipeline ÷ tar | zstd);"
	echo "÷ peer = ckstream against \`tar | zstd -1 -T0\` (plain) or the openssl pipeline (encrypted)."
	echo
	echo "| place | cache | op | tool | time s | MB/s | CPU s | output bytes | ÷ unencrypted (time) | ÷ unencrypted (CPU) | ÷ peer (time) |"
	echo "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|"
	for w in $WHERE; do
		for c in $(caches_of "$w"); do
			for op in pack unpack; do
				for tool in "${FILE_TOOLS[@]}"; do
					local q=(part=files where="$w" cache="$c" op="$op")
					t=$(med time "${q[@]}" tool="$tool") cpu=$(med cpu "${q[@]}" tool="$tool") ob=$(med out_bytes "${q[@]}" tool="$tool")
					tw=${TWIN[$tool]:-} pr=${PEER[$tool]:-}
					echo "| $(place "$w") | $([[ $w == shm ]] && echo – || echo "$c") | $op | ${LABEL[$tool]} | $(f 2 "$t") |" \
						"$(div "$DS_BYTES" "$(awk -v t="$t" 'BEGIN {print t * 1e6}')" 0) | $(f 2 "$cpu") | $(n0 "$ob") |" \
						"$([[ -n $tw ]] && ratio "$t" "$(med time "${q[@]}" tool="$tw")" || echo –) |" \
						"$([[ -n $tw ]] && ratio "$cpu" "$(med cpu "${q[@]}" tool="$tw")" || echo –) |" \
						"$([[ -n $pr ]] && ratio "$t" "$(med time "${q[@]}" tool="$pr")" || echo –) |"
					if [[ $tool == ck-zstd-es ]]; then
						local zc
						zc=$(med cpu "${q[@]}" tool=ck-zstd)
						TARGETS+=("files $op, $(place "$w")$([[ $w == disk ]] && echo " $c"): $(ratio "$t" "$(med time "${q[@]}" tool=ck-zstd)") time, $(ratio "$cpu" "$zc") CPU ($(fsub "$cpu" "$zc" 2) CPU-s)")
					fi
				done
			done
		done
	done
}

criu_report() {
	local w c tool q d fr r dc rc ab ib tw pr
	echo "## (b) Processes: \`dump\` (killing) and \`restore\` of a $MIB MiB memtest (MEMTEST_FILL=$MEMTEST_FILL)"
	echo
	echo "One memtest per place, dumped and restored $((REPS * ${#CRIU_TOOLS[@]})) times; memory verified after every restore."
	echo "dump/restore s = wall (tmpfs) or wall + \`sync\` (disk, page cache dropped before every dump and restore);"
	echo "freeze = CRIU's freezing + frozen time; MB/s = CRIU image bytes ÷ dump time. The peer stages CRIU's images on tmpfs in both places;"
	echo "its freeze ends when \`criu dump\` ends (the process is gone), so its dump time includes packing and encrypting after it."
	echo
	echo "| place | tool | dump s | freeze s | restore s | dump CPU s | restore CPU s | MB/s dump | archive bytes | ÷ unencrypted dump / freeze / restore | ÷ peer dump / freeze / restore |"
	echo "|---|---|--:|--:|--:|--:|--:|--:|--:|---|---|"
	for w in $WHERE; do
		c=warm
		[[ $w == disk ]] && c=cold
		for tool in "${CRIU_TOOLS[@]}"; do
			q=(part=criu where="$w" cache="$c")
			d=$(med time "${q[@]}" op=dump tool="$tool") fr=$(med freeze "${q[@]}" op=dump tool="$tool")
			r=$(med time "${q[@]}" op=restore tool="$tool")
			dc=$(med cpu "${q[@]}" op=dump tool="$tool") rc=$(med cpu "${q[@]}" op=restore tool="$tool")
			ab=$(med out_bytes "${q[@]}" op=dump tool="$tool") ib=$(med in_bytes "${q[@]}" op=dump tool="$tool")
			tw=${TWIN[$tool]:-} pr=${CRIU_PEER[$tool]:-}
			vs() { # OTHER-TOOL
				echo "$(ratio "$d" "$(med time "${q[@]}" op=dump tool="$1")") / $(ratio "$fr" "$(med freeze "${q[@]}" op=dump tool="$1")") / $(ratio "$r" "$(med time "${q[@]}" op=restore tool="$1")")"
			}
			echo "| $(place "$w") | ${LABEL[$tool]} | $(f 2 "$d") | $(f 2 "$fr") | $(f 2 "$r") | $(f 2 "$dc") | $(f 2 "$rc") |" \
				"$(div "$ib" "$(awk -v t="$d" 'BEGIN {print t * 1e6}')" 0) | $(n0 "$ab") | $([[ -n $tw ]] && vs "$tw" || echo –) | $([[ -n $pr ]] && vs "$pr" || echo –) |"
			if [[ $tool == ck-zstd-es ]]; then
				local zc
				zc=$(med cpu "${q[@]}" op=dump tool=ck-zstd)
				TARGETS+=("process, $(place "$w"): dump / freeze / restore $(vs ck-zstd); dump CPU $(ratio "$dc" "$zc") ($(fsub "$dc" "$zc" 2) CPU-s)")
			fi
		done
	done
}

{
	echo "# crypto bench $STAMP"
	echo
	echo "- host: $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -1)), $(free -g | awk '/Mem:/ {print $2}') GiB RAM, kernel $(uname -r)"
	echo "- ckstream $("$CKSTREAM" --version | awk '{print $2}') at $CK_REV; $(openssl version | cut -d' ' -f1-2); zstd $(zstd -V | grep -o 'v[0-9.]*' | head -1)$(part criu && echo "; criu $("$CRIU" --version | sed -n 's/^Version: *//p')")"
	places=()
	where shm && places+=("tmpfs = $SHM")
	where disk && places+=("disk = $DISK_DIR ($(fs_of "$DISK_DIR"))")
	echo "- places: $(printf '%s; ' "${places[@]}" | sed 's/; $//')"
	echo "- REPS=$REPS, tool order rotating each rep, medians; load average at start $LOAD_START, at end $LOAD_END; ${T_TOTAL}s in all"
	echo
	if part files; then files_report; echo; fi
	if part criu; then criu_report; echo; fi
	echo "## \`-c zstd --sign --encrypt-to\` ÷ \`-c zstd\` (target ≤ 1.1)"
	echo
	for t in "${TARGETS[@]}"; do echo "- $t"; done
	if ((${#CHECKS[@]})); then
		echo
		echo "Correctness:"
		for c in "${CHECKS[@]}"; do echo "- $c"; done
	fi
	echo
	echo "Per-step data: $(basename "$TSV")."
} | tee "$REPORT"
log "report: $REPORT"

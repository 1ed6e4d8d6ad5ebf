#!/usr/bin/env bash
# Fleet in small: N daemons (the release binary), each with its own simulated thermostats, its
# own database in a temp dir and a [[sinks.mqtt]] (QoS 1, tls = false) to one shared private
# mosquitto on 127.0.0.1, for a bounded time. Reports each daemon's RSS (VmRSS, VmHWM) and CPU %,
# their sum/median/max, the broker's CPU % and RSS, messages/s and bytes/s into the broker
# (counted by a QoS 1 subscriber to hvac-edge/#), and whether every committed event arrived
# (each daemon's `queue stats --json` against the distinct event ids the subscriber saw).
#
#   scripts/fleet.sh                           # 50 daemons x 20 devices at 2 changes/s, 60 s
#   scripts/fleet.sh --daemons 10 --secs 20    # other knobs: --devices D, --rate R (changes/s
#                                              # per daemon), --warmup S, --keep (keep the dir)
#   scripts/fleet.sh --outage 10               # also stop the broker for 10 s a third into the
#                                              # window, restart it (sessions kept on disk) and
#                                              # report when the daemons reconnected
#
# Every process it starts is stopped on exit (trap), by its pid. Loopback only; bounded in time.
# The summary is also written to bench-results/fleet-latest.txt. See docs/fleet.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

N=50
SECS=60
WARMUP=10
DEVICES=20
RATE=2
KEEP=0
OUTAGE=0
ARGS="$*"
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --daemons) N=$2; shift 2 ;;
        --secs) SECS=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --devices) DEVICES=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --outage) OUTAGE=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
int() { [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] && [ "$2" -le "$4" ] || { echo "$1 must be an integer in $3..$4" >&2; exit 2; }; }
int --daemons "$N" 1 500
int --secs "$SECS" 5 1800
int --warmup "$WARMUP" 1 300
int --devices "$DEVICES" 1 10000
int --outage "$OUTAGE" 0 600
[ "$OUTAGE" -eq 0 ] || [ $((SECS / 3 + OUTAGE + 5)) -lt "$SECS" ] || { echo "--secs must leave room for the outage (secs/3 + outage + 5 < secs)" >&2; exit 2; }
[[ "$RATE" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "--rate must be a number" >&2; exit 2; }

# --- what it needs ---------------------------------------------------------------------------
export PATH="$PATH:/usr/sbin"
need=()
command -v mosquitto >/dev/null 2>&1 || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v jq >/dev/null 2>&1 || need+=(jq)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target-bench}"
BIN="${HVAC_EDGE_BIN:-$CARGO_TARGET_DIR/release/hvac-edge}"
if [ ! -x "$BIN" ]; then
    echo "building the release binary into $CARGO_TARGET_DIR" >&2
    nice -n 10 cargo build --release --bin hvac-edge
fi

# --- cleanup: every process started here, by pid ---------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/hvac-fleet.XXXXXX")
DAEMONS=()
BROKER=""
SUB=""
stop_pids() { # stop_pids GRACE_SECS PID... : SIGTERM, wait (bounded), SIGKILL what is left
    local grace=$1; shift
    local p live
    for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 1 $((grace * 10))); do
        live=0
        for p in "$@"; do kill -0 "$p" 2>/dev/null && live=1 && break; done
        [ "$live" -eq 0 ] && break
        sleep 0.1
    done
    for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; done
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
}
cleanup() {
    trap - EXIT INT TERM
    [ -n "$NAP" ] && kill "$NAP" 2>/dev/null
    [ ${#DAEMONS[@]} -gt 0 ] && stop_pids 25 "${DAEMONS[@]}"
    [ -n "$SUB" ] && stop_pids 2 "$SUB"
    [ -n "$BROKER" ] && stop_pids 5 "$BROKER"
    if [ "$KEEP" -eq 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Sleeps in the background and waits, so that a signal runs the trap at once.
NAP=""
nap() { sleep "$1" & NAP=$!; wait "$NAP" || true; NAP=""; }
log() { echo "[fleet $(date -u +%H:%M:%S)] $*" >&2; }
now() { date +%s.%N; }
ticks() { # utime + stime of a pid, clock ticks (0 when gone)
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $(( ${12} + ${13} ))
}
kib() { awk -v k="$2:" '$1 == k { print $2; f = 1 } END { if (!f) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0; }
free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$(( 20000 + RANDOM % 30000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    echo "no free port found" >&2; exit 1
}
HZ=$(getconf CLK_TCK)

# --- broker and counting subscriber ----------------------------------------------------------
PORT=$(free_port)
# Run as root, mosquitto switches to the user "mosquitto", which cannot write its persistence
# file into this directory ("Error: Permission denied" at exit): the sessions would then not
# survive the outage, and what the daemons publish before the counting subscriber is back would
# be dropped by the broker (not lost by the daemons: they got their PUBACKs). Keep the user.
RUN_AS=""
[ "$(id -u)" -eq 0 ] && RUN_AS="user root"
cat > "$WORK/mosquitto.conf" <<EOF
$RUN_AS
listener $PORT 127.0.0.1
allow_anonymous true
persistence true
persistence_location $WORK/
autosave_interval 3600
max_inflight_messages 1000
max_queued_messages 0
log_dest stderr
log_type error
log_type warning
log_type notice
connection_messages true
log_timestamp true
EOF
start_broker() {
    mosquitto -c "$WORK/mosquitto.conf" >> "$WORK/mosquitto.log" 2>&1 &
    BROKER=$!
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
    kill -0 "$BROKER" 2>/dev/null || { echo "mosquitto did not start:"; cat "$WORK/mosquitto.log"; exit 1; } >&2
}
start_broker
# One line per message: arrival time (Unix s, ns), topic, payload length, payload (compact JSON).
# Persistent session (-c): what arrives while it reconnects after an outage waits for it.
mosquitto_sub -h 127.0.0.1 -p "$PORT" -q 1 -c -i fleet-counter -t 'hvac-edge/#' -F '%U %t %l %p' \
    > "$WORK/sub.log" 2> "$WORK/sub.err" &
SUB=$!
sleep 0.5
kill -0 "$SUB" 2>/dev/null || { echo "mosquitto_sub did not start:"; cat "$WORK/sub.err"; exit 1; } >&2

# --- the fleet -------------------------------------------------------------------------------
log "starting $N daemons ($DEVICES devices, $RATE changes/s each) on broker port $PORT"
for i in $(seq 1 "$N"); do
    gw=$(printf 'gw-%03d' "$i")
    d="$WORK/$gw"
    mkdir -p "$d"
    cat > "$d/hvac-edge.toml" <<EOF
[gateway]
id = "$gw"

[store]
path = "$d/hvac-edge.db"

[log]
level = "warn"

[[sources.simulator]]
name = "sim"
devices = $DEVICES
changes_per_sec = $RATE
seed = $i

[[sinks.mqtt]]
name = "upstream"
host = "127.0.0.1"
port = $PORT
tls = false
client_id = "hvac-edge-$gw"
EOF
    "$BIN" run --allow-root -c "$d/hvac-edge.toml" > "$d/daemon.log" 2>&1 &
    DAEMONS+=($!)
done

alive_count() { local c=0 p; for p in "${DAEMONS[@]}"; do kill -0 "$p" 2>/dev/null && c=$((c + 1)); done; echo "$c"; }
log "warm-up ${WARMUP} s"
nap "$WARMUP"
declare -a T0
for i in "${!DAEMONS[@]}"; do T0[i]=$(ticks "${DAEMONS[i]}"); done
B0=$(ticks "$BROKER"); S0=$(ticks "$SUB"); L0=$(wc -l < "$WORK/sub.log"); W0=$(now)
log "measuring ${SECS} s"
end=$(( $(date +%s) + SECS ))
outage_at=$(( $(date +%s) + SECS / 3 ))
BSTOP=0
DOWN_AT=0
UP_AT=0
while [ "$(date +%s)" -lt "$end" ]; do
    if [ "$OUTAGE" -gt 0 ] && [ "$UP_AT" -eq 0 ] && [ "$(date +%s)" -ge "$outage_at" ]; then
        log "broker outage: stopping mosquitto for ${OUTAGE} s"
        BSTOP=$(( $(ticks "$BROKER") - B0 ))
        B0=0
        stop_pids 10 "$BROKER"
        DOWN_AT=$(date +%s)
        nap "$OUTAGE"
        start_broker
        UP_AT=$(date +%s)
        log "broker back (pid $BROKER)"
    fi
    nap 1
    a=$(alive_count)
    [ "$a" -eq "$N" ] || log "WARNING: only $a of $N daemons alive"
done
declare -a T1 RSS HWM
for i in "${!DAEMONS[@]}"; do
    T1[i]=$(ticks "${DAEMONS[i]}")
    RSS[i]=$(kib "${DAEMONS[i]}" VmRSS)
    HWM[i]=$(kib "${DAEMONS[i]}" VmHWM)
done
B1=$(ticks "$BROKER"); S1=$(ticks "$SUB"); L1=$(wc -l < "$WORK/sub.log"); W1=$(now)
BRSS=$(kib "$BROKER" VmRSS); BHWM=$(kib "$BROKER" VmHWM)
ALIVE=$(alive_count)

log "stopping the daemons (SIGTERM: flush, retained offline)"
stop_pids 25 "${DAEMONS[@]}"
DAEMONS=()
# Let the subscriber take the tail: wait until its count stands still (bounded).
prev=-1
for _ in $(seq 1 20); do
    cur=$(wc -l < "$WORK/sub.log")
    [ "$cur" -eq "$prev" ] && break
    prev=$cur
    sleep 0.5
done
stop_pids 2 "$SUB"; SUB=""

# --- figures ---------------------------------------------------------------------------------
ELAPSED=$(awk -v a="$W0" -v b="$W1" 'BEGIN { printf "%.3f", b - a }')
stats() { # stdin: numbers; prints "sum median max"
    sort -g | awk '{ a[NR] = $1; s += $1 } END {
        if (NR == 0) { print "0 0 0"; exit }
        m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        printf "%.2f %.2f %.2f\n", s, m, a[NR] }'
}
: > "$WORK/per-daemon.tsv"
for i in $(seq 0 $((N - 1))); do
    gw=$(printf 'gw-%03d' $((i + 1)))
    cpu=$(awk -v a="${T0[i]}" -v b="${T1[i]}" -v hz="$HZ" -v s="$ELAPSED" 'BEGIN { printf "%.3f", (b - a) / hz / s * 100 }')
    q=$("$BIN" queue stats --json --db "$WORK/$gw/hvac-edge.db" 2>/dev/null \
        | jq -r '[.last_pos, ((.sinks[] | select(.name == "upstream") | .cursor) // -1), ((.sinks[] | select(.name == "upstream") | .dead_letters) // -1)] | @tsv' 2>/dev/null) \
        || q=$'-1\t-1\t-1'
    warn=$(grep -c -E ' (WARN|ERROR) ' "$WORK/$gw/daemon.log" 2>/dev/null || true)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$gw" "$cpu" "${RSS[i]}" "${HWM[i]}" "$q" "$warn" >> "$WORK/per-daemon.tsv"
done
# Subscriber log: per gateway, distinct event ids (4-level topics) and all event messages;
# status messages (3 levels) separately. Window: lines L0+1..L1.
awk '{
    n = split($2, t, "/")
    if (n == 4) {
        gw = t[2]; all[gw]++
        if (match($0, /"id":"[^"]*"/)) { k = gw SUBSEP substr($0, RSTART + 6, RLENGTH - 7); if (!(k in seen)) { seen[k] = 1; uniq[gw]++ } }
    } else if (n == 3 && t[3] == "status") { st[t[2]]++ }
} END { for (g in all) printf "%s\t%d\t%d\t%d\n", g, uniq[g], all[g], st[g] }' "$WORK/sub.log" | sort > "$WORK/received.tsv"
read -r WMSGS WBYTES < <(sed -n "$((L0 + 1)),${L1}p" "$WORK/sub.log" \
    | awk '{ n = split($2, t, "/"); if (n == 4) { m++; b += $3 + length($2) } } END { printf "%d %d\n", m, b }')
# Longest silence per gateway between two event messages inside the window (an outage shows
# here: its length plus the reconnect backoff plus the sink's retry wait): median and max, s.
read -r GAP_MED GAP_MAX < <(sed -n "$((L0 + 1)),${L1}p" "$WORK/sub.log" \
    | awk '{ n = split($2, t, "/"); if (n != 4) next; g = t[2]
             if (g in last && $1 - last[g] > gap[g]) gap[g] = $1 - last[g]; last[g] = $1 }
           END { for (g in gap) print gap[g] }' | sort -g \
    | awk '{ a[NR] = $1 } END { if (NR == 0) { print "- -"; exit }
             m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.1f %.1f\n", m, a[NR] }')

# Every daemon, with what the subscriber got from it (0 when nothing).
awk -F'\t' -v OFS='\t' 'FILENAME == ARGV[1] { rx[$1] = $2 OFS $3 OFS $4; next }
    { print $0, (($1 in rx) ? rx[$1] : "0" OFS "0" OFS "0") }' \
    "$WORK/received.tsv" "$WORK/per-daemon.tsv" > "$WORK/joined.tsv"
read -r CPU_SUM CPU_MED CPU_MAX < <(cut -f2 "$WORK/per-daemon.tsv" | stats)
read -r RSS_SUM RSS_MED RSS_MAX < <(cut -f3 "$WORK/per-daemon.tsv" | awk '{ print $1 / 1024 }' | stats)
read -r HWM_SUM HWM_MED HWM_MAX < <(cut -f4 "$WORK/per-daemon.tsv" | awk '{ print $1 / 1024 }' | stats)
read -r COMMITTED CURSOR_OK DEAD WARNED < <(awk -F'\t' '{ c += $5; if ($6 == $5) ok++; if ($7 > 0) d += $7; if ($8 > 0) w++ } END { printf "%d %d %d %d\n", c, ok, d, w }' "$WORK/per-daemon.tsv")
read -r UNIQ ALLMSG COMPLETE MISSING < <(awk -F'\t' '{ u += $9; a += $10; if ($9 >= $5) ok++; else miss += $5 - $9 } END { printf "%d %d %d %d\n", u, a, ok, miss }' "$WORK/joined.tsv")
BCPU=$(awk -v a="$B0" -v b="$B1" -v x="$BSTOP" -v hz="$HZ" -v s="$ELAPSED" 'BEGIN { printf "%.2f", (b - a + x) / hz / s * 100 }')
SCPU=$(awk -v a="$S0" -v b="$S1" -v hz="$HZ" -v s="$ELAPSED" 'BEGIN { printf "%.2f", (b - a) / hz / s * 100 }')
MPS=$(awk -v m="$WMSGS" -v s="$ELAPSED" 'BEGIN { printf "%.1f", m / s }')
BPS=$(awk -v m="$WBYTES" -v s="$ELAPSED" 'BEGIN { printf "%.0f", m / s }')
PERGW=$(awk -v m="$MPS" -v n="$N" 'BEGIN { printf "%.2f", m / n }')
BPM=$(awk -v b="$WBYTES" -v m="$WMSGS" 'BEGIN { if (m > 0) printf "%.0f", b / m; else print 0 }')

REPORT="$WORK/report.txt"
{
    echo "hvac-edge fleet in small: \`scripts/fleet.sh $ARGS\`"
    echo "$N daemons x $DEVICES simulated devices at $RATE changes/s each, [[sinks.mqtt]] QoS 1 (tls = false, max_inflight 100) to one mosquitto $(mosquitto -h 2>/dev/null | awk 'NR == 1 { print $3 }') on 127.0.0.1;"
    echo "warm-up ${WARMUP} s, measured over ${ELAPSED} s; $(nproc) CPUs, shared and noisy (load average $(cut -d' ' -f1-3 /proc/loadavg) at the end): compare ratios, not absolutes."
    echo
    echo "| figure | sum | median | max |"
    echo "|---|---|---|---|"
    echo "| daemon CPU, % of one core | $CPU_SUM | $CPU_MED | $CPU_MAX |"
    echo "| daemon VmRSS, MiB | $RSS_SUM | $RSS_MED | $RSS_MAX |"
    echo "| daemon VmHWM, MiB | $HWM_SUM | $HWM_MED | $HWM_MAX |"
    echo
    echo "| figure | value |"
    echo "|---|---|"
    echo "| daemons alive at the end of the window | $ALIVE of $N |"
    echo "| broker (mosquitto) CPU, % of one core | $BCPU |"
    echo "| broker VmRSS / VmHWM, MiB | $(awk -v a="$BRSS" -v b="$BHWM" 'BEGIN { printf "%.1f / %.1f", a / 1024, b / 1024 }') |"
    echo "| counting subscriber (mosquitto_sub) CPU, % of one core | $SCPU |"
    echo "| event messages/s into the broker (at the subscriber) | $MPS ($PERGW per gateway) |"
    echo "| payload + topic bytes/s | $BPS ($BPM per message) |"
    echo "| longest silence of one gateway at the subscriber, median / max, s | $GAP_MED / $GAP_MAX |"
    echo "| events committed by all daemons (queue stats last_pos) | $COMMITTED |"
    echo "| daemons whose sink cursor = last_pos after stop | $CURSOR_OK of $N |"
    echo "| distinct event ids received / all event messages received | $UNIQ / $ALLMSG |"
    echo "| daemons with every committed event received | $COMPLETE of $N (missing: $MISSING) |"
    echo "| dead letters (all daemons) | $DEAD |"
    echo "| daemons with WARN/ERROR log lines | $WARNED |"
    if [ "$OUTAGE" -gt 0 ]; then
        echo
        echo "Broker outage: down at $DOWN_AT for ${OUTAGE} s, back at $UP_AT (epoch s). Daemon connections after the"
        echo "restart, by second after the broker was back (mosquitto's log, 1 s resolution):"
        awk -v up="$UP_AT" '$1 ~ /^[0-9]+:$/ && /New client connected/ && / as hvac-edge-gw-/ {
                t = substr($1, 1, length($1) - 1) - up; if (t >= 0) h[t]++ }
            END { for (t in h) printf "%d %d\n", t, h[t] }' "$WORK/mosquitto.log" | sort -n \
            | awk '{ printf "  +%ds: %d connections\n", $1, $2 }'
        echo "  (the daemon's reconnect backoff: 0.5 s doubling to 30 s, each wait jittered down to half)"
    fi
    if [ "$WARNED" -gt 0 ]; then
        echo
        echo "WARN/ERROR lines (count, level, target, message; time stamps removed):"
        cat "$WORK"/gw-*/daemon.log | grep -E ' (WARN|ERROR) ' \
            | sed -E 's/^[^ ]+ +//; s/(error|pending_from|retry_in_ms)=.*$//' | sort | uniq -c | sort -rn | head -8
    fi
} > "$REPORT"
cat "$REPORT"
mkdir -p "$ROOT/bench-results"
cp "$REPORT" "$ROOT/bench-results/fleet-latest.txt"
{ printf 'gateway\tcpu_pct\tvmrss_kib\tvmhwm_kib\tlast_pos\tcursor\tdead\twarn_lines\tuniq_rx\tall_rx\tstatus_rx\n'; cat "$WORK/joined.tsv"; } \
    > "$ROOT/bench-results/fleet-per-daemon.tsv"
echo
echo "per-daemon figures: bench-results/fleet-per-daemon.tsv"
[ "$COMPLETE" -eq "$N" ] && [ "$CURSOR_OK" -eq "$N" ]

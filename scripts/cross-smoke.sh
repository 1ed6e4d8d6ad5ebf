#!/usr/bin/env bash
# Smoke test of a cross-built hvac-edge under qemu-user (docs/install.md "Cross-building").
#
#   scripts/cross-smoke.sh TARGET [--profile P] [--bin PATH]
#
# Runs the binary that scripts/cross-build.sh TARGET built (default profile `gateway`; --bin
# takes any other file): gnu targets under qemu-aarch64/qemu-arm with -L <cross sysroot>, the
# static musl build under plain qemu-aarch64, x86_64 natively. Steps, each PASS or FAIL:
#   1. --version
#   2. check-config -c config/hvac-edge.toml (the reference config; no secret files needed)
#   3. a 10 s demo (receiver outage at 3 s for 4 s) that must end with its OK summary
#   4. the daemon (run --allow-root) against a mosquitto started here on 127.0.0.1 (temp dir,
#      `user root`), with one Zigbee2MQTT source and an HTTP sink to a closed loopback port:
#      thermostat messages published with mosquitto_pub -q 1 must be committed (queue stats
#      --json, run by the same binary: events stored and pending for the sink)
#   5. SIGTERM: the daemon exits 0
# Installs qemu-user, mosquitto and mosquitto-clients when missing. Every command has a timeout;
# the whole run is bounded (about 3 minutes at most). Exits 1 if any step failed, and prints
# one summary line.
set -uo pipefail
. "$(dirname "$0")/cross-common.sh"

usage() { echo "usage: $0 TARGET [--profile P] [--bin PATH]   (TARGET: $TARGETS)" >&2; exit 2; }
[ $# -ge 1 ] || usage
TARGET="$1"; shift
PROFILE=gateway
BIN=""
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) [ $# -ge 2 ] || usage; PROFILE="$2"; shift 2 ;;
        --bin) [ $# -ge 2 ] || usage; BIN="$2"; shift 2 ;;
        *) usage ;;
    esac
done
target_info "$TARGET" || usage
cd "$ROOT"
[ -n "$BIN" ] || BIN="$(binary_path "$TARGET" "$PROFILE")"
if [ ! -x "$BIN" ]; then
    echo "no binary at $BIN: run scripts/cross-build.sh $TARGET first" >&2
    exit 2
fi

set -e
apt_ensure mosquitto mosquitto-clients
[ -n "$QEMU" ] && apt_ensure qemu-user
set +e

RUN=()
if [ -n "$QEMU" ]; then
    RUN=("$QEMU")
    [ -n "$SYSROOT" ] && RUN+=(-L "$SYSROOT")
fi
RUN+=("$BIN")

TMP="$(mktemp -d /tmp/hvac-edge-smoke.XXXXXX)"
BROKER_PID=""
DAEMON_PID=""
cleanup() {
    # Only the processes this script started, by their ids.
    [ -n "$DAEMON_PID" ] && kill -KILL "$DAEMON_PID" 2>/dev/null
    [ -n "$BROKER_PID" ] && kill -KILL "$BROKER_PID" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

passed=0
failed=0
failures=()
pass() { echo "PASS $1"; passed=$((passed + 1)); }
# fail NAME [FILE...]: the last lines of each FILE are shown under the FAIL line.
fail() {
    local name="$1"; shift
    echo "FAIL $name"
    for f in "$@"; do [ -f "$f" ] && sed 's/^/     | /' "$f" | tail -n 25; done
    failed=$((failed + 1)); failures+=("$name")
}
# Polls "$@" every 0.2 s until it succeeds or $1 seconds have passed.
wait_for() {
    local secs="$1"; shift
    local deadline=$(( $(date +%s) + secs ))
    until "$@"; do
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

echo "cross-smoke: $TARGET, $BIN ($(stat -c %s "$BIN") bytes)"
if [ -n "$QEMU" ]; then
    echo "runner: $QEMU${SYSROOT:+ -L $SYSROOT} ($("$QEMU" --version | head -1))"
else
    echo "runner: native"
fi

# ---------------------------------------------------------------- 1. --version
if timeout 60 "${RUN[@]}" --version >"$TMP/version.out" 2>&1 && grep -q '^hvac-edge [0-9]' "$TMP/version.out"; then
    pass "--version: $(cat "$TMP/version.out")"
else
    fail "--version" "$TMP/version.out"
fi

# ---------------------------------------------------------------- 2. check-config
if timeout 60 "${RUN[@]}" check-config -c config/hvac-edge.toml >"$TMP/check.out" 2>&1 \
    && grep -q '^config/hvac-edge.toml is valid: ' "$TMP/check.out"; then
    pass "check-config -c config/hvac-edge.toml: $(head -1 "$TMP/check.out")"
else
    fail "check-config -c config/hvac-edge.toml" "$TMP/check.out"
fi

# ---------------------------------------------------------------- 3. demo
t0=$(date +%s)
timeout 120 "${RUN[@]}" demo --quiet --duration-secs 10 --outage-at-secs 3 --outage-secs 4 >"$TMP/demo.out" 2>&1
demo_rc=$?
demo_secs=$(( $(date +%s) - t0 ))
if [ "$demo_rc" -eq 0 ] && grep -q 'result *: OK: nothing lost, nothing out of order' "$TMP/demo.out"; then
    pass "demo (10 s, outage 3-7 s, ${demo_secs} s wall): $(grep -E 'events committed|events received|seq gaps' "$TMP/demo.out" | sed 's/^ *//; s/  */ /g' | tr '\n' ';' | sed 's/;$//; s/;/; /g')"
else
    fail "demo (exit $demo_rc)" "$TMP/demo.out"
fi

# ---------------------------------------------------------------- 4. daemon + mosquitto
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
PORT="$(free_port)"
DEAD_PORT="$(free_port)"   # nothing listens there: the sink holds every event
CLIENT_ID="hvac-edge-smoke-$$"
BASE="smoke$$"
cat >"$TMP/mosquitto.conf" <<EOF
listener $PORT 127.0.0.1
allow_anonymous true
max_inflight_messages 1000
max_queued_messages 0
persistence false
log_dest file $TMP/mosquitto.log
log_type all
user root
EOF
"$MOSQUITTO" -c "$TMP/mosquitto.conf" >"$TMP/mosquitto.stderr" 2>&1 &
BROKER_PID=$!
broker_up() { timeout 3 mosquitto_pub -h 127.0.0.1 -p "$PORT" -t smoke/ping -m up -q 1 2>/dev/null; }
if wait_for 15 broker_up; then
    broker_ok=1
else
    broker_ok=0
    fail "mosquitto on 127.0.0.1:$PORT" "$TMP/mosquitto.stderr" "$TMP/mosquitto.log"
fi

cat >"$TMP/hvac-edge.toml" <<EOF
[gateway]
id = "gw-smoke"
clock = "trusted"

[store]
path = "$TMP/db/hvac-edge.db"

[pipeline]
commit_delay_ms = 0
shutdown_grace_secs = 2
checkpoint_interval_secs = 1

[[sources.mqtt]]
name = "z2m"
host = "127.0.0.1"
port = $PORT
client_id = "$CLIENT_ID"
base_topic = "$BASE"

[[sinks.http]]
name = "upstream"
url = "http://127.0.0.1:$DEAD_PORT/v1/events"
allow_insecure_http = true
request_timeout_ms = 1000
retry_schedule_secs = [3600]
EOF

stats_json() { timeout 30 "${RUN[@]}" queue stats --json --db "$TMP/db/hvac-edge.db" >"$TMP/stats.json" 2>"$TMP/stats.err"; }
json_int() { grep -o "\"$1\": *[0-9]*" "$TMP/stats.json" | head -1 | grep -o '[0-9]*$'; }

if [ "$broker_ok" -eq 1 ]; then
    # Not `timeout`: the shell must hold the daemon's own pid to send it SIGTERM; the waits
    # below are bounded and the trap kills it if anything goes wrong.
    RUST_LOG=info NOTIFY_SOCKET="" "${RUN[@]}" run --allow-root -c "$TMP/hvac-edge.toml" >"$TMP/daemon.log" 2>&1 &
    DAEMON_PID=$!
    alive() { kill -0 "$DAEMON_PID" 2>/dev/null; }
    subscribed() { grep -q "Sending SUBACK to $CLIENT_ID" "$TMP/mosquitto.log" 2>/dev/null; }
    wait_for 60 eval 'subscribed || ! alive'
    if subscribed && alive; then
        pass "run --allow-root: connected and subscribed to $BASE/# on 127.0.0.1:$PORT"
        pub() { timeout 10 mosquitto_pub -h 127.0.0.1 -p "$PORT" -q 1 -t "$1" -m "$2"; }
        ok=1
        pub "$BASE/living-room/availability" '{"state":"online"}' || ok=0
        pub "$BASE/living-room" '{"local_temperature":20.4,"current_heating_setpoint":21,"system_mode":"heat","running_state":"heat","humidity":45,"linkquality":120}' || ok=0
        pub "$BASE/living-room" '{"local_temperature":20.9,"current_heating_setpoint":21,"system_mode":"heat","running_state":"heat","humidity":45,"linkquality":118}' || ok=0
        pub "$BASE/living-room" '{"local_temperature":20.9,"current_heating_setpoint":19.5,"system_mode":"heat","running_state":"idle","humidity":45,"linkquality":118}' || ok=0
        pub "$BASE/office" '{"local_temperature":22.1,"occupied_heating_setpoint":20,"system_mode":"auto","running_state":"idle"}' || ok=0
        if [ "$ok" -eq 1 ]; then
            pass "mosquitto_pub -q 1: 5 Zigbee2MQTT messages (2 thermostats)"
        else
            fail "mosquitto_pub" "$TMP/mosquitto.log"
        fi
        # Committed: at least one event per state change (setpoint 21 -> 19.5, temperature
        # 20.4 -> 20.9, load state, the second device), all pending for the unreachable sink.
        committed() {
            stats_json || return 1
            local stored pending
            stored="$(json_int events_stored)"; pending="$(json_int pending)"
            [ "${stored:-0}" -ge 5 ] && [ "${pending:-0}" -ge 5 ] && [ "$(json_int devices)" = 2 ]
        }
        wait_for 60 eval 'committed || ! alive'
        if alive && committed; then
            pass "queue stats --json: $(json_int events_stored) events stored, $(json_int devices) devices, $(json_int pending) pending for sink upstream"
        else
            fail "queue stats --json (events committed)" "$TMP/stats.json" "$TMP/stats.err" "$TMP/daemon.log"
        fi
        kill -TERM "$DAEMON_PID"
        exited() { ! kill -0 "$DAEMON_PID" 2>/dev/null; }
        if wait_for 30 exited; then
            wait "$DAEMON_PID"; rc=$?
            DAEMON_PID=""
            if [ "$rc" -eq 0 ]; then
                pass "SIGTERM: exit 0 ($(grep -c . "$TMP/daemon.log") log lines, last: $(tail -1 "$TMP/daemon.log" | cut -c1-120))"
            else
                fail "SIGTERM: exit $rc (want 0)" "$TMP/daemon.log"
            fi
        else
            fail "SIGTERM: still running after 30 s" "$TMP/daemon.log"
        fi
    else
        if alive; then
            fail "run --allow-root: no subscription within 60 s" "$TMP/daemon.log" "$TMP/mosquitto.log"
        else
            wait "$DAEMON_PID"; rc=$?; DAEMON_PID=""
            fail "run --allow-root: exited ($rc) before subscribing" "$TMP/daemon.log"
        fi
    fi
fi
kill -TERM "$BROKER_PID" 2>/dev/null; wait "$BROKER_PID" 2>/dev/null; BROKER_PID=""

if [ "$failed" -eq 0 ]; then
    echo "cross-smoke $TARGET: OK, $passed passed, 0 failed"
    exit 0
fi
echo "cross-smoke $TARGET: FAILED, $passed passed, $failed failed: $(IFS=';'; echo "${failures[*]}" | sed 's/;/; /g')"
exit 1

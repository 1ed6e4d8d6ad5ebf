#!/usr/bin/env bash
# The project's test command (README "Tests"): installs what the tests need on a fresh
# Debian machine, then runs formatting, lints and every test against real components
# (a mosquitto broker per test, HTTP receivers and SQLite files on loopback/temp dirs).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto mosquitto-clients)
command -v socat >/dev/null 2>&1 || need+=(socat)
# systemd-analyze verify/security on the unit file (tests/it/deploy.rs); no running systemd needed.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# A real terminal for the sparkline and table screens (tests/it/technician.rs).
command -v tmux >/dev/null 2>&1 || need+=(tmux)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Debian installs mosquitto in /usr/sbin, which is not on every PATH.
export PATH="$PATH:/usr/sbin"

# Python tools in a local venv: the reference Standard Webhooks verifier (interop test) and
# pymodbus, the real Modbus RTU slave of the serial tests (3.11.4: its datastore API is the one
# tests/support/modbus_slave.py uses; 3.16 replaced it), and prometheus-client, whose text-format
# parser reads the daemon's /metrics in the metrics test.
if ! .venv/bin/python -c "import standardwebhooks, pymodbus, serial, prometheus_client; assert pymodbus.__version__ == '3.11.4'" >/dev/null 2>&1; then
    rm -rf .venv
    if ! python3 -m venv .venv; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
        rm -rf .venv && python3 -m venv .venv
    fi
    .venv/bin/pip install -q --disable-pip-version-check "standardwebhooks==1.1.0" "pymodbus[serial]==3.11.4" "prometheus-client==0.21.1"
fi

cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets -- --test-threads "${TEST_THREADS:-2}"

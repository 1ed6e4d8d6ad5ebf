#!/usr/bin/env bash
# Serial-source benchmark (issue 3 figures): OTGW parser frames/s, JSON-lines mapper lines/s,
# daemon CPU while polling 16 Modbus RTU units every second (socat pty + pymodbus slave), and
# register change -> committed event latency. About 1 minute (plus the first build).
#
#   scripts/bench-serial.sh            # full run
#   scripts/bench-serial.sh --quick    # shorter windows
#
# Needs socat and .venv with pymodbus: run scripts/test.sh once first (it installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-bench}"
command -v socat >/dev/null 2>&1 || { echo "socat missing: run scripts/test.sh first" >&2; exit 1; }
exec cargo bench --bench serial -- "$@"

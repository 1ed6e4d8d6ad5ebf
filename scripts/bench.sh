#!/usr/bin/env bash
# Pipeline benchmark: the daemon side by side with the raw limits of this machine, measured in
# the same run. Loopback traffic only; about 5-8 minutes on 2 cores (plus the first build).
#
#   scripts/bench.sh                      # full run (backlog 1,000,000 events)
#   scripts/bench.sh --quick              # small parameters, under 2 minutes
#   scripts/bench.sh --backlog 200000     # other knobs: --messages N, --latency-secs S,
#                                         # --idle-secs S, --receiver-batches N,
#                                         # --only raw,ingest,drain, --json PATH
#
# Prints the report table; writes the same figures to bench-results/latest.json.
# Builds in its own target dir (CARGO_TARGET_DIR, default target-bench) so it does not fight
# other builds over target/.
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-bench}"

if ! command -v mosquitto >/dev/null 2>&1; then
    echo "mosquitto not found; installing it with apt-get" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    $SUDO apt-get install -y mosquitto
fi
# Debian starts a system broker on 1883 after installing; the bench starts its own on a free
# port and never touches that one.

exec cargo bench --bench pipeline -- "$@"

#!/usr/bin/env bash
# Runs the libFuzzer targets of fuzz/ (issue 11, "Fuzzing") one after the other, each for
# SECONDS (default 600), under `nice -n 19`, and prints one summary line per target.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]      # default: every target
#   CMIN=1 scripts/fuzz.sh 600 otgw            # also minimise fuzz/corpus/otgw afterwards
#                                              # (edge coverage kept; commit the result)
#
# Targets: z2m generic_mapping otgw jsonl modbus_map config (see fuzz/fuzz_targets/common.rs).
# New corpus entries are written to fuzz/corpus/<target>/ (commit them after `CMIN=1`);
# a crash or timeout is written to fuzz/artifacts/<target>/ and the run of that target stops.
# Full libFuzzer logs: fuzz/target/fuzz-logs/<target>.log.
#
# cargo-fuzz needs nightly flags; the stable toolchain accepts them with RUSTC_BOOTSTRAP=1.
# The committed corpus is replayed on stable by `cargo test --test fuzz_corpus`.
set -euo pipefail

cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
all=(z2m generic_mapping otgw jsonl modbus_map config)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all[@]}"); fi

export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    nice -n 19 cargo install cargo-fuzz --locked
fi

# The same flags for build and run, so that `run` does not rebuild. No sanitizer: the code
# fuzzed is safe Rust, and panics (overflow checks and debug assertions are on) are the findings.
flags=(-s none --codegen-units 16 --target-dir fuzz/target)
nice -n 19 cargo fuzz build "${flags[@]}" >&2

mkdir -p fuzz/target/fuzz-logs
status=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="fuzz/target/fuzz-logs/$t.log"
    extra=()
    [ -f "fuzz/dicts/$t.dict" ] && extra+=("-dict=fuzz/dicts/$t.dict")
    rc=0
    nice -n 19 cargo fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" "${extra[@]}" </dev/null >"$log" 2>&1 || rc=$?
    execs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | tail -1 | awk '{print $2}')
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | awk '{print $2}')
    corp=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1 | awk '{print $2}')
    speed=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | tail -1 | awk '{print $2}')
    if [ "$rc" -eq 0 ]; then
        result="no crash"
    else
        status=1
        result="FAILED (exit $rc): $(grep -o 'Test unit written to .*' "$log" | tail -1 || true)"
    fi
    if [ "${CMIN:-0}" = 1 ] && [ "$rc" -eq 0 ]; then
        # Keep a smallest set of inputs covering every edge (-use_counters=0: hit-count
        # features alone do not keep an input), plus the named regress-* reproducers.
        tmp=$(mktemp -d)
        bin="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release/$t"
        nice -n 19 "$bin" -merge=1 -use_counters=0 "$tmp" "fuzz/corpus/$t" >>"$log" 2>&1 &&
            find "fuzz/corpus/$t" -maxdepth 1 -type f ! -name 'regress-*' -delete &&
            cp "$tmp"/* "fuzz/corpus/$t/"
        rm -rf "$tmp"
    fi
    printf '%-16s %5ss  execs=%-10s exec/s=%-7s cov=%-6s ft=%-6s corpus=%-12s %s\n' \
        "$t" "$secs" "${execs:-?}" "${speed:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$result"
done
exit "$status"

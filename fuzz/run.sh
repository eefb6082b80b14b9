#!/usr/bin/env bash
# Runs every cargo-fuzz target; fails on the first crash.
#   fuzz/run.sh [SECONDS]     each target for SECONDS (default 20)
#   fuzz/run.sh --runs N      each target for N executions (make fuzz-long: 10 million)
# Prints the executions of every target at the end.
# Needs the nightly toolchain; installs cargo-fuzz when `cargo fuzz --version` does not work.
# Crashes are kept in fuzz/artifacts/<target>/, the corpus grows in fuzz/corpus/<target>/.
set -euo pipefail
SANITIZER=()
usage() { echo "usage: $0 [SECONDS] | --runs N" >&2; exit 2; }
if [ "${1:-}" = "--runs" ]; then
    RUNS=${2:-}
    case $RUNS in '' | *[!0-9]*) usage ;; esac
    LIMIT=(-runs="$RUNS")
    WHAT="$RUNS executions"
    # The code under test is safe Rust: what is looked for is panics, which need no sanitizer.
    # Without AddressSanitizer the targets run several times faster (filter_input ~5x).
    SANITIZER=(--sanitizer none)
else
    SECONDS_PER_TARGET=${1:-20}
    case $SECONDS_PER_TARGET in '' | *[!0-9]*) usage ;; esac
    LIMIT=(-max_total_time="$SECONDS_PER_TARGET")
    WHAT="${SECONDS_PER_TARGET}s"
fi
cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz
fi
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "the nightly toolchain is required: rustup toolchain install nightly" >&2
    exit 2
fi

TARGETS=$(cargo fuzz list)
# Seed corpora from the unit-test fixtures so the fuzzer starts from real shapes.
mkdir -p corpus/admin_json corpus/orca corpus/snapshot corpus/grpc_framing corpus/config corpus/filter_input
cp ../core/src/testdata/admin_clusters.json corpus/admin_json/envoy_1_40_sample.json
printf '%s' 'TEXT cpu_utilization=0.3, rps_fractional=120, named_metrics.queue_depth=5' > corpus/orca/text
printf '%s' 'JSON {"cpu_utilization":0.3,"rps_fractional":120,"named_metrics":{"queue_depth":5}}' > corpus/orca/json
printf '%s' 'BIN CQAAAAAAAPA/' > corpus/orca/bin
printf '\x00\x02\x03\x00\x09\x00\x00\x00\x00\x00\x03abc\x01\x00\x00\x00\x00' > corpus/grpc_framing/two_msgs
printf '{}' > corpus/config/empty
# filter_input: fields separated by NUL (see fuzz_targets/filter_input.rs): admin status, admin
# body, endpoint header, device id, content-type, source address, request body, :status,
# grpc-status, ORCA, response body, trailer grpc-status, trailer ORCA.
printf '200\0{"cluster_statuses":[]}\0\xff\xfe\0dev\xff1\0application/grpc\0127.0.0.1:5000\0\x01\x02\0200\0\0TEXT cpu_utilization=1\xff\0\x03\0\xff\0TEXT cpu_utilization=0.5' \
    > corpus/filter_input/hostile

LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
failed=()
for t in $TARGETS; do
    echo "=== fuzz $t for $WHAT" >&2
    if ! cargo +nightly fuzz run "${SANITIZER[@]}" "$t" -- "${LIMIT[@]}" -print_final_stats=1 2>&1 | tee "$LOGS/$t.log" >&2; then
        failed+=("$t")
    fi
done
echo "executions per target:" >&2
for t in $TARGETS; do
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOGS/$t.log" | tail -1)
    seconds=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$LOGS/$t.log" | tail -1)
    printf '  %-14s %12s%s\n' "$t" "${runs:-?}" "${seconds:+ in ${seconds}s}" >&2
    if [ -n "${RUNS:-}" ] && { [ -z "$runs" ] || [ "$runs" -lt "$RUNS" ]; }; then
        failed+=("$t (fewer than $RUNS executions)")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED targets: ${failed[*]} (see fuzz/artifacts/)" >&2
    exit 1
fi
echo "all fuzz targets ran $WHAT without a crash: $(echo $TARGETS)" >&2

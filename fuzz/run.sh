#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 20); fails on the first crash.
#   fuzz/run.sh [SECONDS]
# Needs the nightly toolchain; installs cargo-fuzz when `cargo fuzz --version` does not work.
# Crashes are kept in fuzz/artifacts/<target>/, the corpus grows in fuzz/corpus/<target>/.
set -euo pipefail
SECONDS_PER_TARGET=${1:-20}
case $SECONDS_PER_TARGET in '' | *[!0-9]*) echo "usage: $0 SECONDS" >&2; exit 2 ;; esac
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
mkdir -p corpus/admin_json corpus/orca corpus/snapshot corpus/grpc_framing corpus/config
cp ../core/src/testdata/admin_clusters.json corpus/admin_json/envoy_1_40_sample.json
printf '%s' 'TEXT cpu_utilization=0.3, rps_fractional=120, named_metrics.queue_depth=5' > corpus/orca/text
printf '%s' 'JSON {"cpu_utilization":0.3,"rps_fractional":120,"named_metrics":{"queue_depth":5}}' > corpus/orca/json
printf '%s' 'BIN CQAAAAAAAPA/' > corpus/orca/bin
printf '\x00\x02\x03\x00\x09\x00\x00\x00\x00\x00\x03abc\x01\x00\x00\x00\x00' > corpus/grpc_framing/two_msgs
printf '{}' > corpus/config/empty

failed=()
for t in $TARGETS; do
    echo "=== fuzz $t for ${SECONDS_PER_TARGET}s" >&2
    if ! cargo +nightly fuzz run "$t" -- -max_total_time="$SECONDS_PER_TARGET" -print_final_stats=1; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED targets: ${failed[*]} (see fuzz/artifacts/)" >&2
    exit 1
fi
echo "all fuzz targets ran ${SECONDS_PER_TARGET}s without a crash: $(echo $TARGETS)" >&2

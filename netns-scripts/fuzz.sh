#!/usr/bin/env bash
# Fuzz the parsers that read bytes from the network or the kernel, each for a bounded time, with libFuzzer
# (swift build -sanitize=fuzzer,address of the separate package in Fuzz/).
#   netns-scripts/fuzz.sh [--time SECONDS] [TARGET...]     targets: frames handshake netlink datagrams (default: all)
# Corpus: Fuzz/corpus/TARGET (not committed), started from the committed seeds in Fuzz/seeds/TARGET.
# A crash leaves its input in Fuzz/crashes/TARGET-*; turn it into a unit test, then fix. Prints one line per
# target: runs, coverage (cov/ft), corpus size, exec/s, and "crashes: N". Exit 1 if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/../Fuzz"

seconds=60
targets=()
while (($#)); do
    case $1 in
        --time) seconds=$2; shift 2 ;;
        -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
        *) targets+=("$1"); shift ;;
    esac
done
((${#targets[@]})) || targets=(frames handshake netlink datagrams)

echo "== building the fuzz targets (-sanitize=fuzzer,address)"
swift build -c debug -Xswiftc -sanitize=fuzzer,address 2>&1 | grep -v "Cannot export local symbol" | tail -3
bin=.build/debug/nbs-fuzz

# Seeds (committed in Fuzz/seeds): valid frames and handshakes from the real encoders, netlink datagrams
# captured from a real kernel. They are made once, when missing; the working corpus starts from them.
if [[ ! -d seeds/frames || ! -d seeds/handshake || ! -d seeds/datagrams ]]; then
    NBS_FUZZ_WRITE_SEEDS=$PWD/seeds "$bin" >/dev/null
fi
if [[ ! -d seeds/netlink ]]; then
    mkdir -p seeds/netlink
    python3 - ../Tests/NBSNetlinkTests/CapturedMessages.swift seeds/netlink <<'PY'
import re, sys
hexes = re.findall(r'"([0-9a-f]{32,})"', open(sys.argv[1]).read())
for i, h in enumerate(hexes):
    open("%s/seed-%d" % (sys.argv[2], i), "wb").write(bytes.fromhex(h))
PY
fi
mkdir -p corpus crashes
for t in frames handshake netlink datagrams; do
    mkdir -p "corpus/$t"
    cp -n seeds/$t/* "corpus/$t/"
done

failed=0
for t in "${targets[@]}"; do
    log=$(mktemp)
    started=$SECONDS
    rc=0
    NBS_FUZZ_TARGET=$t "$bin" "corpus/$t" -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=4096 \
        -artifact_prefix="crashes/$t-" >"$log" 2>&1 || rc=$?
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' <<<"$last" || true)
    ft=$(grep -o 'ft: [0-9]*' <<<"$last" || true)
    corp=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' <<<"$last" || true)
    crashes=$(ls crashes/ 2>/dev/null | grep -c "^$t-" || true)
    echo "$t: $((SECONDS - started))s of ${seconds}s, $runs runs ($speed/s), ${cov:-cov: ?}, ${ft:-ft: ?}, ${corp:-corp: ?}, crashes: $crashes (exit $rc)"
    if ((rc != 0)); then
        failed=1
        grep -E 'ERROR|Fatal|precondition|SUMMARY' "$log" | head -5
    fi
    rm -f "$log"
done
exit "$failed"

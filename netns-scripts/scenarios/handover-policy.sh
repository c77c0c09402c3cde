#!/usr/bin/env bash
# `--policy handover`: the primary path carries the data, the other path is standby, and takes over when the
# primary fails. Two transfers on the same two-path topology:
#   1. no fault (NBS_BYTES_QUIET, default 4 MiB): client subflows whose local address is on path 2
#      (198.51.100.0/24, 2001:db8:2::/64) sent < 10 % of the bytes (per-subflow bytes_sent in the JSON);
#   2. the client's path-1 link goes down ~2 s in (NBS_BYTES, default 8 MiB): path 2 (nbs2's tx counter)
#      carried < 10 % of what the client sent before the fault, and the session completes intact with the
#      receiver's max_stall_ms under NBS_STALL_BOUND_MS (default 1000 ms, as link-down.sh).
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES, NBS_BYTES_QUIET, NBS_FAULT_DELAY (s, default 2),
#      NBS_TIMEOUT (s per process, default 60), NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((8 * 1024 * 1024))}
quiet_bytes=${NBS_BYTES_QUIET:-$((4 * 1024 * 1024))}
bound=${NBS_STALL_BOUND_MS:-1000}
path2="${NBS_SUB4[2]},${NBS_SUB6[2]}"
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_scenario_start --rate "${NBS_RATE:-10}"

echo "== 1. both paths up: path 2 must stay (nearly) idle"
quiet=$NBS_TMP/quiet
nbs_transfer "$quiet" "$quiet_bytes" --policy handover
nbs_check "$quiet" "$quiet_bytes" "$NBS_CRC" "$NBS_SRC" --max-sent-share "$path2" 10 || nbs_fail "handover without a fault"

echo "== 2. path 1 goes down: path 2 takes over"
out=$NBS_TMP/xfer
a1=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_1") a2=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_2")
b1=$a1 b2=$a2 # the counters when the fault starts (set by the fault command)
# shellcheck disable=SC2016 # the fault command is eval'd later, on purpose
nbs_transfer_with_fault "$out" "$bytes" "${NBS_FAULT_DELAY:-2}" \
    'b1=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_1"); b2=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_2"); nbs_link_down 1 c' \
    --policy handover
tx1=$((b1 - a1)) tx2=$((b2 - a2))
echo "client tx before the fault: path 1 $tx1 B, path 2 $tx2 B"
if ((tx1 + tx2 == 0 || tx2 * 10 >= tx1 + tx2)); then
    nbs_fail "before the fault path 2 carried $tx2 of $((tx1 + tx2)) B (want < 10 %)"
fi
nbs_verdict handover-policy "$out" "$bytes" "$bound" || exit 1

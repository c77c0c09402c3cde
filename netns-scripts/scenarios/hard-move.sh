#!/usr/bin/env bash
# Hard move: the client starts with addresses on path 1 only (192.0.2.1, 2001:db8:1::1; nbs2 is up with no
# address). ~2 s into the transfer both are deleted (the only path is lost), and 0.5 s later the client gets new
# addresses on nbs2 (198.51.100.11/24, 2001:db8:2::11/64). The session must survive (wait, then JOIN from the new
# address), complete with every byte intact, stall at most NBS_STALL_BOUND_MS (default 10000 ms, 10x the 1 s
# target), and a subflow from a new address must have carried data.
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 8 MiB, ~7 s), NBS_FAULT_DELAY (s, default 2),
#      NBS_MOVE_GAP (s without any address, default 0.5), NBS_TIMEOUT (s per process, default 60),
#      NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((8 * 1024 * 1024))}
bound=${NBS_STALL_BOUND_MS:-10000}
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_scenario_start --rate "${NBS_RATE:-10}" --move c

out=$NBS_TMP/xfer
nbs_transfer_with_fault "$out" "$bytes" "${NBS_FAULT_DELAY:-2}" "nbs_move c ${NBS_MOVE_GAP:-0.5}" --policy aggregate
moved=$(nbs_json "$out.client" \
    "sum(f.get('bytes_sent') or 0 for f in j.get('subflows') or [] if f.get('local') in ('$NBS_C4_MOVED', '$NBS_C6_MOVED'))" \
    2>/dev/null || echo 0)
echo "bytes sent from the new addresses: $moved"
if ! [[ $moved =~ ^[0-9]+$ ]] || ((moved == 0)); then
    nbs_fail "no subflow from $NBS_C4_MOVED or $NBS_C6_MOVED carried data"
fi
nbs_verdict hard-move "$out" "$bytes" "$bound" || exit 1

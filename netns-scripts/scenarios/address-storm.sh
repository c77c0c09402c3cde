#!/usr/bin/env bash
# Address storm: ~2 s into a two-path transfer (--max-subflows 4) the client gets 200 extra addresses on nbs2
# (IPv4 and IPv6, 400 in all, in one batch), keeps them 0.5 s and loses them again; then twice more. The session
# must complete intact, never exceed its subflow limit (subflows_max <= 4 on both sides), leave no extra TCP
# sockets behind in the client namespace 2 s after the storm, and stall at most NBS_STALL_BOUND_MS (default 2000).
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 12 MiB), NBS_FAULT_DELAY (s, default 2),
#      NBS_TIMEOUT (s per process, default 60), NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((12 * 1024 * 1024))}
bound=${NBS_STALL_BOUND_MS:-2000}
limit=4
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_scenario_start --rate "${NBS_RATE:-10}"

out=$NBS_TMP/xfer
sockets="?" # TCP sockets in the client namespace 2 s after the storm (set by the fault command)
# shellcheck disable=SC2016 # the fault command is eval'd later, on purpose
nbs_transfer_with_fault "$out" "$bytes" "${NBS_FAULT_DELAY:-2}" \
    'for k in 1 2 3; do nbs_addr_storm c 200 0.5; sleep 0.2; done; sleep 2; sockets=$(nbs_c ss -Htn | wc -l)' \
    --policy aggregate --max-subflows "$limit"
echo "TCP sockets in the client namespace 2 s after the storm: $sockets"
if [[ $sockets =~ ^[0-9]+$ ]] && ((sockets > limit)); then
    nbs_c ss -tn | head -20
    nbs_fail "$sockets TCP sockets in the client namespace after the storm (limit $limit subflows)"
fi
for side in client server; do
    m=$(nbs_json "$out.$side" 'j.get("subflows_max")' 2>/dev/null || echo "?")
    echo "$side subflows_max: $m"
    if ! [[ $m =~ ^[0-9]+$ ]] || ((m > limit)); then nbs_fail "$side subflows_max $m > $limit"; fi
done
nbs_verdict address-storm "$out" "$bytes" "$bound" || exit 1

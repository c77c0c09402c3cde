#!/usr/bin/env bash
# NAT rebinding (UDP subflows only): the client sits behind the NAT router of nat.sh; about 2 s into a transfer
# the router's masquerade moves to another port range and its connection tracking is flushed, so every flow
# the client has open leaves with a new public port, without any event on the client. The server must
# recognise the session's authenticated datagrams from the new ports, check each new path and follow it:
# the transfer completes intact (same count and SHA-256), the server reports the rebinding, and its
# subflows end at the router's new ports. (TCP subflows cannot survive this: the server would answer the
# new port's segments with resets, and the session would have to rejoin; that is why the scenario is UDP's.)
# Env: NBS_RATE (tbf Mbit/s on the client's links, default 10), NBS_BYTES (default 10 MiB), NBS_TIMEOUT (s per
#      process, default 60), NBS_BIN.
# transports: udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

# UDP's scenario: run bare, it must not fall back to lib.sh's default transport (tcp).
export NBS_TRANSPORT=udp
bytes=${NBS_BYTES:-$((10 * 1024 * 1024))}
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_require_cmd nft "nftables"
nbs_require_cmd conntrack "conntrack"
nbs_scenario_start --rate "${NBS_RATE:-10}" --nat

# New UDP mappings from another port range; the flush makes every open flow take one.
rebind() {
    nbs_r nft -f - <<'NFT'
flush chain inet nbs_nat nat_out
add rule inet nbs_nat nat_out oifname "nbsw" meta l4proto udp masquerade to :40000-40999
add rule inet nbs_nat nat_out oifname "nbsw" masquerade
NFT
    nbs_r conntrack -F 2>/dev/null
}

out=$NBS_TMP/xfer
nbs_transfer_with_fault "$out" "$bytes" "${NBS_FAULT_DELAY:-2}" rebind --policy aggregate
echo "--- events"
nbs_events "$out"

ok=1
nbs_check "$out" "$bytes" "$NBS_CRC" "$NBS_SRC" || ok=0
[[ -n $NBS_FAULT_AT ]] || { echo "FAIL: the transfer ended before the rebinding"; ok=0; }
rebound=$(nbs_json "$out.server" "sum('NAT rebinding' in str(e.get('event')) for e in j.get('events') or [])" 2>/dev/null || echo 0)
echo "subflows the server followed to a new port: $rebound"
((rebound > 0)) || { echo "FAIL: the server followed no subflow to its new port"; ok=0; }
if ((ok)); then
    echo "PASS nat-rebinding: followed $rebound, max_stall_ms $(nbs_json "$out.server" 'j.get("max_stall_ms")' 2>/dev/null || echo '?') (fault at ${NBS_FAULT_AT}s)"
else
    echo "FAIL nat-rebinding"
    exit 1
fi

#!/usr/bin/env bash
# NAT: the client (two links, 192.0.2.1 and 198.51.100.1, plus IPv6) sits behind a router namespace that
# masquerades with nft to the server (203.0.113.2, 2001:db8:3::2); the server has no route to the client's
# addresses and the router forwards only flows the client opened. A transfer by name must complete intact
# (same count and SHA-256 on both sides), the server must see only the router's public addresses as the
# subflows' remote ends (the NAT was crossed), and each client link must have carried at least a fifth of the
# bytes (multipath behind NAT: only the opener creates subflows).
# Env: NBS_RATE (tbf Mbit/s on the client's links, default 10), NBS_BYTES (default 10 MiB), NBS_TIMEOUT (s per
#      process, default 60), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((10 * 1024 * 1024))}
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_require_cmd nft "nftables"
nbs_scenario_start --rate "${NBS_RATE:-10}" --nat

spid="" cpid="" crc=0 src=0 # set by nbs_serve_bg, nbs_connect_bg, nbs_wait_rc
port=$(nbs_port)
out=$NBS_TMP/xfer
nbs_serve_bg spid "$port" "$out" --sink
a1=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_1") a2=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_2")
nbs_connect_bg cpid "$port" "$out" "$bytes" --policy aggregate
nbs_wait_rc crc "$cpid"
nbs_wait_rc src "$spid"
tx1=$(($(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_1") - a1)) tx2=$(($(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_2") - a2))
echo "client tx bytes: path 1 $tx1, path 2 $tx2"
echo "--- events"
nbs_events "$out"

ok=1
nbs_check "$out" "$bytes" "$crc" "$src" || ok=0
remotes=$(nbs_json "$out.server" "' '.join(sorted(set(str(f.get('remote')) for f in j.get('subflows') or [])))" 2>/dev/null || true)
echo "remote ends seen by the server: ${remotes:-none}"
for r in $remotes; do
    if [[ $r != "$NBS_NAT_R4" && $r != "$NBS_NAT_R6" ]]; then
        echo "FAIL: the server saw a subflow from $r, not from the router's public address"
        ok=0
    fi
done
if ((tx1 < bytes / 5 || tx2 < bytes / 5)); then
    echo "FAIL: one client link carried too little: path 1 $tx1 B, path 2 $tx2 B of $bytes"
    ok=0
fi
if ((ok)); then
    echo "PASS nat: max_stall_ms $(nbs_json "$out.server" 'j.get("max_stall_ms")' 2>/dev/null || echo '?')"
else
    echo "FAIL nat"
    exit 1
fi

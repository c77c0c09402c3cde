#!/usr/bin/env bash
# Two paths, one session: the client sends NBS_BYTES (default 8 MiB) to a sink by name; the bytes must arrive
# intact (same count, same SHA-256), more than one client subflow must have carried data, and each of the
# two physical paths (client tx counters of nbs1 and nbs2) must have carried at least a fifth of the bytes.
# Env: NBS_RATE (tbf Mbit/s per path, default 10, 0 = none), NBS_BYTES, NBS_TIMEOUT (s, default 120), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((8 * 1024 * 1024))}

nbs_scenario_start --rate "${NBS_RATE:-10}"

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

ok=1
nbs_check "$out" "$bytes" "$crc" "$src" --min-active-subflows 2 || ok=0
if ((tx1 < bytes / 5 || tx2 < bytes / 5)); then
    echo "FAIL: one path carried too little: path 1 $tx1 B, path 2 $tx2 B of $bytes"
    ok=0
fi
if ((ok)); then
    echo "PASS two-path-transfer"
else
    echo "FAIL two-path-transfer"
    exit 1
fi

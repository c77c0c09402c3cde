#!/usr/bin/env bash
# Two paths, one session: the client sends NBS_BYTES (default 8 MiB) to a sink by name; the bytes must arrive
# intact (same count, same SHA-256) and more than one client subflow must have carried data.
# Env: NBS_RATE (tbf Mbit/s per path, default 10, 0 = none), NBS_BYTES, NBS_TIMEOUT (s, default 120), NBS_BIN.
set -euo pipefail
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((8 * 1024 * 1024))}

nbs_require_netns
nbs_require_bin
nbs_cleanup_on_exit
nbs_tmpdir
nbs_topology_create --rate "${NBS_RATE:-10}"

port=$(nbs_port)
out=$NBS_TMP/xfer
nbs_serve_bg spid "$port" "$out" --sink
nbs_connect_bg cpid "$port" "$out" "$bytes" --policy aggregate
nbs_wait_rc crc "$cpid"
nbs_wait_rc src "$spid"

if nbs_check "$out" "$bytes" "$crc" "$src" --min-active-subflows 2; then
    echo "PASS two-path-transfer"
else
    echo "FAIL two-path-transfer"
    exit 1
fi

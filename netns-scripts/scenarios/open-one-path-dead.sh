#!/usr/bin/env bash
# Open with one path dead: nft on the client silently drops everything on path 1 (nbs1) from before the open to
# the end of the transfer. Every address of the server is tried from its own path first, so after the attempt
# over path 1 runs out of time the open must reach the server over path 2 (an open used to try each server
# address from the client's first address only, so it failed on all four), and the transfer must complete
# with every byte intact.
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 2 MiB), NBS_TIMEOUT (s per process,
#      default 60), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

nbs_require_cmd nft "nftables"
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}
nbs_scenario_start --rate "${NBS_RATE:-10}"
bytes=${NBS_BYTES:-$((2 * 1024 * 1024))} prefix=$NBS_TMP/xfer
port=$(nbs_port)
nbs_serve_bg spid "$port" "$prefix" --sink
nbs_blackhole 1 c
nbs_log "client path 1 blackholed; opening"
NBS_FAULT_AT=0
nbs_connect_bg cpid "$port" "$prefix" "$bytes" --policy aggregate
nbs_wait_rc NBS_CRC "$cpid"
nbs_wait_rc NBS_SRC "$spid"
nbs_blackhole_clear c
nbs_log "client exit $NBS_CRC, server exit $NBS_SRC"
nbs_verdict open-one-path-dead "$prefix" "$bytes" 5000 || exit 1

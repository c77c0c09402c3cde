#!/usr/bin/env bash
# Open through a blackhole: nft on the client silently drops everything on both of its paths (no link event)
# when it opens the session, and for NBS_HOLD_S (default 1.5) s after. The open must wait it out, as a TCP
# connect does by sending its SYN again (over UDP subflows the local drop makes every send fail with EPERM,
# and SwiftNIO closes a socket whose send fails), and the transfer must then complete with every byte intact.
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 2 MiB), NBS_HOLD_S (default 1.5),
#      NBS_TIMEOUT (s per process, default 60), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

nbs_require_cmd nft "nftables"
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}
nbs_scenario_start --rate "${NBS_RATE:-10}"
bytes=${NBS_BYTES:-$((2 * 1024 * 1024))} hold=${NBS_HOLD_S:-1.5} prefix=$NBS_TMP/xfer
port=$(nbs_port)
nbs_serve_bg spid "$port" "$prefix" --sink
nbs_blackhole 1,2 c
nbs_log "both client paths blackholed; opening"
t0=$(date +%s%N)
nbs_connect_bg cpid "$port" "$prefix" "$bytes" --policy aggregate
sleep "$hold"
nbs_blackhole_clear c
NBS_FAULT_AT=$(awk -v n="$(date +%s%N)" -v t="$t0" 'BEGIN { printf "%.2f", (n - t) / 1e9 }')
nbs_log "blackhole cleared at ${NBS_FAULT_AT}s"
nbs__pid_alive "$cpid" || nbs_fail "the client had ended before the blackhole cleared: $(tail -3 "$prefix.client.err")"
nbs_wait_rc NBS_CRC "$cpid"
nbs_wait_rc NBS_SRC "$spid"
nbs_log "client exit $NBS_CRC, server exit $NBS_SRC"
nbs_verdict open-through-blackhole "$prefix" "$bytes" 5000 || exit 1

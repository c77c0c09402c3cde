#!/usr/bin/env bash
# Open with one path dead: nft on the client silently drops everything on path 1 (nbs1) from before the open to
# the end of the transfer. Every address of the server is tried from its own path first, and the attempt over
# path 2 starts beside the silent one after NBSOptions.openAttemptDelay (250 ms, RFC 8305's Connection Attempt
# Delay; over UDP at least 1 s), so the open must reach the server within 2.5 s (ten times 250 ms; one pair at a
# time it took the 5 s connect timeout or handshake budget), and the transfer must complete with every byte
# intact. Over TCP a first
# session, before the fault, leaves the client holding the server's Fast Open cookies: the silent attempt is
# then a Fast Open SYN carrying the OPEN, and the path-2 attempt, a plain connect, must take over from it once
# connected (the client logs it); the session it makes must still use Fast Open for its JOINs (the client
# kernel's TCPFastOpenActive moves).
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
transport=${NBS_TRANSPORT:-tcp}
if [[ $transport == tcp ]]; then
    warm=$NBS_TMP/warm
    nbs_transfer "$warm" 65536 --policy aggregate
    nbs_check "$warm" 65536 "$NBS_CRC" "$NBS_SRC" >/dev/null || nbs_fail "the session before the fault failed"
    nbs_log "a session before the fault: the client holds the server's Fast Open cookies"
fi
port=$(nbs_port)
nbs_serve_bg spid "$port" "$prefix" --sink
nbs_blackhole 1 c
nbs_log "client path 1 blackholed; opening"
NBS_FAULT_AT=0
fast_open0=$(nbs_tcp_ext "$NBS_NS_C" TCPFastOpenActive)
launched=$(date +%s.%N)
nbs_connect_bg cpid "$port" "$prefix" "$bytes" --policy aggregate
nbs_wait_rc NBS_CRC "$cpid"
nbs_wait_rc NBS_SRC "$spid"
nbs_blackhole_clear c
nbs_log "client exit $NBS_CRC, server exit $NBS_SRC"
# The client's report starts when open returns; process start and name resolution count against the bound.
open_s=$(awk -v a="$(nbs_json "$prefix.client" 'j["started_unix"]' 2>/dev/null || echo 0)" -v b="$launched" 'BEGIN { printf "%.2f", a - b }')
nbs_log "open took ${open_s}s from the client's launch"
awk -v s="$open_s" 'BEGIN { exit !(s > 0 && s < 2.5) }' || nbs_fail "the open took ${open_s}s (bound 2.5 s)"
if [[ $transport == tcp ]]; then
    grep -q "Fast Open SYN of open pair 1 is still unanswered" "$prefix.client.err" ||
        nbs_fail "the client did not log the path-2 attempt taking over from the silent Fast Open attempt"
    fast_open=$(($(nbs_tcp_ext "$NBS_NS_C" TCPFastOpenActive) - fast_open0))
    nbs_log "client TCPFastOpenActive +$fast_open during the session"
    ((fast_open >= 1)) || nbs_fail "the session's JOINs did not use Fast Open (TCPFastOpenActive +$fast_open)"
fi
nbs_verdict open-one-path-dead "$prefix" "$bytes" 5000 || exit 1

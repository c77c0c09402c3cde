#!/usr/bin/env bash
# Blackhole: ~2 s into a two-path transfer, nft on the client silently drops everything in and out of its path-1
# interface (nbs1); the link and the addresses stay, so there is no netlink event: only probing finds it. The
# session must complete with every byte intact (same count and SHA-256 on both sides), and the receiver must not
# stall longer than NBS_STALL_BOUND_MS (default 5000 ms, 10x the 500 ms target).
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 10 MiB, ~7 s), NBS_FAULT_DELAY (s, default 2),
#      NBS_TIMEOUT (s per process, default 60), NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

nbs_require_cmd nft "nftables"
nbs_fault_scenario blackhole 5000 "nbs_blackhole 1 c" || exit 1

#!/usr/bin/env bash
# Flapping: ~2 s into a two-path transfer the client's path-1 link goes down and up every 0.5 s, 6 times
# (down 0.5 s, up 0.5 s; the IPv6 address comes back with the link). The session must complete with every byte
# intact (same count and SHA-256 on both sides) and the receiver must not stall longer than NBS_STALL_BOUND_MS
# (default 10000 ms).
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 10 MiB, ~7 s), NBS_FAULT_DELAY (s, default 2),
#      NBS_FLAPS (default 6), NBS_FLAP_PERIOD (s, default 0.5), NBS_TIMEOUT (s per process, default 60),
#      NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

nbs_fault_scenario flapping 10000 "nbs_flap 1 ${NBS_FLAPS:-6} ${NBS_FLAP_PERIOD:-0.5} c" || exit 1

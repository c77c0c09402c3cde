#!/usr/bin/env bash
# Primary address deleted: ~2 s into a two-path transfer the client's path-1 addresses (192.0.2.1/24 and
# 2001:db8:1::1/64) are deleted while the link stays up. The session must complete with every byte intact (same
# count and SHA-256 on both sides), and the receiver must not stall longer than NBS_STALL_BOUND_MS (default
# 1000 ms, 10x the 100 ms target: netlink reports the deletion at once).
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 10 MiB, ~7 s), NBS_FAULT_DELAY (s, default 2),
#      NBS_TIMEOUT (s per process, default 60), NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

nbs_fault_scenario addr-delete 1000 "nbs_addr_del 1 all c" || exit 1

#!/usr/bin/env bash
# Primary link down: ~2 s into a two-path transfer the client's path-1 link (nbs1) goes down (the kernel also
# deletes its IPv6 addresses there). The session must complete with every byte intact (same count and SHA-256
# on both sides), and the receiver must not stall longer than NBS_STALL_BOUND_MS (default 1000 ms, 10x the
# 100 ms target: netlink reports the link at once).
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 10 MiB, ~7 s), NBS_FAULT_DELAY (s, default 2),
#      NBS_TIMEOUT (s per process, default 60), NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

nbs_fault_scenario link-down 1000 "nbs_link_down 1 c" || exit 1

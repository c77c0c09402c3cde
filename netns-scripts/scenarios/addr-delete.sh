#!/usr/bin/env bash
# Primary address deleted: ~2 s into a two-path transfer the client's path-1 addresses (192.0.2.1/24 and
# 2001:db8:1::1/64) are deleted while the link stays up. The session must complete with every byte intact (same
# count and SHA-256 on both sides), and the receiver must not stall longer than NBS_STALL_BOUND_MS (default
# 1000 ms, 10x the 100 ms target: netlink reports the deletion at once).
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 10 MiB, ~7 s), NBS_FAULT_DELAY (s, default 2),
#      NBS_TIMEOUT (s per process, default 60), NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((10 * 1024 * 1024))}
bound=${NBS_STALL_BOUND_MS:-1000}
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_require_netns
nbs_require_bin
nbs_cleanup_on_exit
nbs_tmpdir
nbs_topology_create --rate "${NBS_RATE:-10}"

out=$NBS_TMP/xfer
nbs_transfer_with_fault "$out" "$bytes" "${NBS_FAULT_DELAY:-2}" "nbs_addr_del 1 all c" --policy aggregate
nbs_verdict addr-delete "$out" "$bytes" "$bound" || exit 1

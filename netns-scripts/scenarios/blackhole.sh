#!/usr/bin/env bash
# Blackhole: ~2 s into a two-path transfer, nft on the client silently drops everything in and out of its path-1
# interface (nbs1); the link and the addresses stay, so there is no netlink event: only probing finds it. The
# session must complete with every byte intact (same count and SHA-256 on both sides), and the receiver must not
# stall longer than NBS_STALL_BOUND_MS (default 5000 ms, 10x the 500 ms target).
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 10 MiB, ~7 s), NBS_FAULT_DELAY (s, default 2),
#      NBS_TIMEOUT (s per process, default 60), NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((10 * 1024 * 1024))}
bound=${NBS_STALL_BOUND_MS:-5000}
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_require_netns
nbs_require_bin
nbs_require_cmd nft "nftables"
nbs_cleanup_on_exit
nbs_tmpdir
nbs_topology_create --rate "${NBS_RATE:-10}"

out=$NBS_TMP/xfer
nbs_transfer_with_fault "$out" "$bytes" "${NBS_FAULT_DELAY:-2}" "nbs_blackhole 1 c" --policy aggregate
nbs_verdict blackhole "$out" "$bytes" "$bound" || exit 1

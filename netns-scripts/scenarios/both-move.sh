#!/usr/bin/env bash
# Both ends move at once (DNS variant): names come from dnsmasq in its own namespace, not from hosts files. Both
# hosts start with path-1 addresses only. ~2 s into the transfer both lose them (client 192.0.2.1, server
# 192.0.2.2 and their IPv6), and 0.5 s later both get new addresses on nbs2 (client 198.51.100.11 /
# 2001:db8:2::11, server 198.51.100.12 / 2001:db8:2::12) and DNS is updated (dnsmasq reloaded). No address the
# client knew for the server works any more: it must re-resolve server.nbs.test and JOIN the new address. The
# session must complete with every byte intact, stall at most NBS_STALL_BOUND_MS (default 20000 ms), and a
# subflow between the two new addresses must have carried data. Also prints how long the DNS change took to
# be visible in the client namespace.
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 8 MiB, ~7 s), NBS_FAULT_DELAY (s, default 2),
#      NBS_MOVE_GAP (s without any address, default 0.5), NBS_TIMEOUT (s per process, default 90),
#      NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((8 * 1024 * 1024))}
bound=${NBS_STALL_BOUND_MS:-20000}
export NBS_TIMEOUT=${NBS_TIMEOUT:-90}

nbs_require_cmd dnsmasq "dnsmasq-base"
nbs_scenario_start --rate "${NBS_RATE:-10}" --dns --move cs
echo "before: $NBS_SERVER_NAME -> $(nbs_resolve c "$NBS_SERVER_NAME"), $NBS_CLIENT_NAME -> $(nbs_resolve s "$NBS_CLIENT_NAME")"

out=$NBS_TMP/xfer
dns_ms="?" # set by the fault command
# shellcheck disable=SC2016 # the fault command is eval'd later, on purpose
nbs_transfer_with_fault "$out" "$bytes" "${NBS_FAULT_DELAY:-2}" \
    'nbs_move cs ${NBS_MOVE_GAP:-0.5}; dns_ms=$(nbs_wait_resolves c "$NBS_SERVER_NAME" "$NBS_S4_MOVED" 5)' \
    --policy aggregate
echo "after: $NBS_SERVER_NAME -> $(nbs_resolve c "$NBS_SERVER_NAME") (visible in the client namespace ${dns_ms} ms after the reload)"
moved=$(nbs_json "$out.client" \
    "sum(f.get('bytes_sent') or 0 for f in j.get('subflows') or [] if (f.get('local'), f.get('remote')) in (('$NBS_C4_MOVED', '$NBS_S4_MOVED'), ('$NBS_C6_MOVED', '$NBS_S6_MOVED')))" \
    2>/dev/null || echo 0)
echo "bytes sent between the new addresses: $moved"
if ! [[ $moved =~ ^[0-9]+$ ]] || ((moved == 0)); then
    nbs_fail "no subflow between the moved addresses ($NBS_C4_MOVED/$NBS_C6_MOVED -> $NBS_S4_MOVED/$NBS_S6_MOVED) carried data"
fi
nbs_verdict both-move "$out" "$bytes" "$bound" || exit 1

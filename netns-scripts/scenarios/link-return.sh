#!/usr/bin/env bash
# A path comes back: ~2 s into a two-path transfer the client's path-1 link goes down, and 1 s later up again
# (with its IPv6 address). The session must complete intact, stall at most NBS_STALL_BOUND_MS (default 2000 ms:
# the return has no target of its own; re-joining and replacing the cross pairs taken while path 1 was away
# costs up to ~0.8 s here, see the issue notes), and use path 1 again once it is back: new subflows from its
# addresses, and nbs1 must carry at least NBS_RETURN_MIN_BYTES (default 1 MiB) after its return.
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 12 MiB), NBS_FAULT_DELAY (s, default 2),
#      NBS_TIMEOUT (s per process, default 60), NBS_SRCROUTE=1 (per-source routing), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((12 * 1024 * 1024))}
bound=${NBS_STALL_BOUND_MS:-2000}
min_after=${NBS_RETURN_MIN_BYTES:-$((1024 * 1024))}
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_scenario_start --rate "${NBS_RATE:-10}"

out=$NBS_TMP/xfer
back=0 # nbs1's tx counter when the link is back (set by the fault command)
# shellcheck disable=SC2016 # the fault command is eval'd later, on purpose
nbs_transfer_with_fault "$out" "$bytes" "${NBS_FAULT_DELAY:-2}" \
    'nbs_link_down 1 c; sleep 1; nbs_link_up 1 c; back=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_1")' --policy aggregate
after=$(($(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_1") - back))
echo "client tx on nbs1 after its return: $after B"
((after >= min_after)) || nbs_fail "path 1 carried $after B after it came back (want >= $min_after)"
rejoined=$(nbs_json "$out.client" \
    "len([e for e in j.get('events') or [] if e.get('t', 0) > $NBS_FAULT_AT + 0.5 and ' up ' in str(e.get('event')) and any(a + ' ->' in str(e.get('event')) for a in ('${NBS_C4[1]}', '${NBS_C6[1]}'))])" \
    2>/dev/null || echo 0)
echo "subflows from path 1's addresses opened after the return: $rejoined"
((rejoined > 0)) || nbs_fail "no new subflow from ${NBS_C4[1]} or ${NBS_C6[1]} after the link came back"
nbs_verdict link-return "$out" "$bytes" "$bound" || exit 1

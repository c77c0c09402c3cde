#!/usr/bin/env bash
# Verified names (DNS variant): names come from dnsmasq in its own namespace. The server runs
# `serve --once --require dns`.
#  1. An impostor: the client claims server.nbs.test, whose records are the server's addresses, not its own.
#     It must be refused on both ends: the client exits non-zero with "peer name verification failed" and
#     "resolves to ..., not <its address>", the server logs the refusal and keeps listening.
#  2. The genuine client (client.nbs.test, published with its address) sends NBS_BYTES; ~2 s in it makes a hard
#     move (its path-1 addresses deleted, 198.51.100.11 / 2001:db8:2::11 added, DNS updated). The session must
#     complete with every byte intact, report peer_verification dnsConfirmed on both ends at the end (a JOIN
#     from the new address is authenticated by the session secret and keeps the level), and a subflow from a
#     new address must have carried data.
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 8 MiB), NBS_FAULT_DELAY (s, default 2),
#      NBS_MOVE_GAP (s, default 0.5), NBS_STALL_BOUND_MS (default 10000), NBS_TIMEOUT (s per process, default 60),
#      NBS_BIN.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((8 * 1024 * 1024))}
bound=${NBS_STALL_BOUND_MS:-10000}
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_require_cmd dnsmasq "dnsmasq-base"
nbs_scenario_start --rate "${NBS_RATE:-10}" --dns --move c
echo "in the server's namespace: $NBS_CLIENT_NAME -> $(nbs_resolve s "$NBS_CLIENT_NAME"), $NBS_SERVER_NAME -> $(nbs_resolve s "$NBS_SERVER_NAME")"

out=$NBS_TMP/xfer
port=$(nbs_port)
spid=""
nbs_serve_bg spid "$port" "$out" --sink --require dns

# 1. The impostor.
lpid=""
lrc=0
nbs_bg lpid "$NBS_NS_C" 30 "$out.impostor" "$out.impostor.err" \
    "$NBS_BIN" connect --name "$NBS_SERVER_NAME" "$NBS_SERVER_NAME:$port" --bytes 1M --json
nbs_wait_rc lrc "$lpid"
echo "impostor: exit $lrc: $(tr '\n' ' ' <"$out.impostor.err")"
((lrc != 0)) || nbs_fail "the impostor's connect succeeded (exit 0)"
grep -q "peer name verification failed" "$out.impostor.err" || nbs_fail "the impostor's error does not say verification failed"
grep -Eq "resolves to .*, not (${NBS_C4[1]}|${NBS_C6[1]})" "$out.impostor.err" ||
    nbs_fail "the impostor's error does not name the addresses and its own"
nbs__pid_alive "$spid" || nbs_fail "the server exited after refusing the impostor"
grep -q "refused $NBS_SERVER_NAME at" "$out.server.err" || nbs_fail "the server did not log the refusal"
[[ ! -s $out.server ]] || nbs_fail "the server reported a session for the impostor: $(cat "$out.server")"

# 2. The genuine client, moving mid-transfer.
NBS_FAULT_AT="" NBS_FAULT_RC=0 NBS_CRC=0 NBS_SRC=0
cpid=""
t0=$(date +%s%N)
nbs_connect_bg cpid "$port" "$out" "$bytes" --policy aggregate
sleep "${NBS_FAULT_DELAY:-2}"
if nbs__pid_alive "$cpid"; then
    NBS_FAULT_AT=$(awk -v n="$(date +%s%N)" -v t="$t0" 'BEGIN { printf "%.2f", (n - t) / 1e9 }')
    nbs_log "fault at ${NBS_FAULT_AT}s: hard move of the client"
    nbs_move c "${NBS_MOVE_GAP:-0.5}" || NBS_FAULT_RC=$?
fi
nbs_wait_rc NBS_CRC "$cpid"
nbs_wait_rc NBS_SRC "$spid"
nbs_log "client exit $NBS_CRC, server exit $NBS_SRC"
echo "after the move: $NBS_CLIENT_NAME -> $(nbs_resolve s "$NBS_CLIENT_NAME")"

for side in server client; do
    level=$(nbs_json "$out.$side" 'j.get("peer_verification")' 2>/dev/null || echo "?")
    echo "$side: peer_verification $level"
    [[ $level == dnsConfirmed ]] || nbs_fail "the $side reports peer_verification $level, not dnsConfirmed"
done
moved=$(nbs_json "$out.client" \
    "sum(f.get('bytes_sent') or 0 for f in j.get('subflows') or [] if f.get('local') in ('$NBS_C4_MOVED', '$NBS_C6_MOVED'))" \
    2>/dev/null || echo 0)
echo "bytes sent from the new addresses: $moved"
if ! [[ $moved =~ ^[0-9]+$ ]] || ((moved == 0)); then
    nbs_fail "no subflow from $NBS_C4_MOVED or $NBS_C6_MOVED carried data"
fi
nbs_verdict verified-names "$out" "$bytes" "$bound" || exit 1

#!/usr/bin/env bash
# Key-verified names on the base topology (names from hosts files). The server has an identity key and runs
# `serve --once --require key`; the client has its own key and uses its self-certifying name (--name omitted).
#  1. An impostor claims the client's self-certifying name without its key: refused on both ends ("is
#     self-certifying, but the peer proved no key"), the server keeps listening.
#  2. A client that pins server.nbs.test to another key refuses the real server ("is pinned to key"): exit ≠ 0,
#     and the server logs that the opener refused it.
#  3. The genuine client, pinning the server's real key and requiring key itself, sends NBS_BYTES: both exit 0,
#     same SHA-256, and both ends report peer_verification keyVerified; the server names the client by its
#     self-certifying name.
# Env: NBS_RATE (default 10), NBS_BYTES (default 2 MiB), NBS_TIMEOUT (s per process, default 60), NBS_BIN.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((2 * 1024 * 1024))}
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_scenario_start --rate "${NBS_RATE:-10}"

keys=$NBS_TMP/keys
mkdir -m 700 "$keys"
"$NBS_BIN" identity --create "$keys/server.key" >"$keys/server.id"
"$NBS_BIN" identity --create "$keys/client.key" >"$keys/client.id"
"$NBS_BIN" identity --create "$keys/other.key" >"$keys/other.id"
server_key=$(sed -n 's/^public_key=//p' "$keys/server.id")
other_key=$(sed -n 's/^public_key=//p' "$keys/other.id")
client_name=$(sed -n 's/^name=//p' "$keys/client.id")
echo "client's self-certifying name: $client_name; server key $server_key"
[[ $(stat -c %a "$keys/client.key") == 600 ]] || nbs_fail "the key file's mode is $(stat -c %a "$keys/client.key"), not 600"

out=$NBS_TMP/xfer
port=$(nbs_port)
spid=""
nbs_serve_bg spid "$port" "$out" --sink --identity "$keys/server.key" --require key

# run_refused LABEL EXPECTED_TEXT CONNECT_ARGS...: a connect that must fail with EXPECTED_TEXT in its error.
run_refused() {
    local label=$1 expected=$2 pid="" rc=0
    shift 2
    nbs_bg pid "$NBS_NS_C" 30 "$out.$label" "$out.$label.err" \
        "$NBS_BIN" connect "$NBS_SERVER_NAME:$port" --bytes 1M --json "$@"
    nbs_wait_rc rc "$pid"
    echo "$label: exit $rc: $(tr '\n' ' ' <"$out.$label.err")"
    ((rc != 0)) || nbs_fail "$label: connect succeeded"
    grep -q -- "$expected" "$out.$label.err" || nbs_fail "$label: the error does not say '$expected'"
}

run_refused impostor "is self-certifying, but the peer proved no key" --name "$client_name"
grep -q "refused $client_name at" "$out.server.err" || nbs_fail "the server did not log refusing the impostor"
run_refused wrong-pin "is pinned to key $other_key" --identity "$keys/client.key" --pin "$NBS_SERVER_NAME=$other_key"
grep -q "refused the session: peer name verification failed" "$out.server.err" ||
    nbs_fail "the server did not log the client's refusal"
nbs__pid_alive "$spid" || nbs_fail "the server exited after the refusals"
[[ ! -s $out.server ]] || nbs_fail "the server reported a session before the genuine client: $(cat "$out.server")"

cpid=""
nbs_connect_bg cpid "$port" "$out" "$bytes" --identity "$keys/client.key" --name auto \
    --pin "$NBS_SERVER_NAME=$server_key" --require key
NBS_CRC=0 NBS_SRC=0
nbs_wait_rc NBS_CRC "$cpid"
nbs_wait_rc NBS_SRC "$spid"
nbs_log "client exit $NBS_CRC, server exit $NBS_SRC"
for side in server client; do
    level=$(nbs_json "$out.$side" 'j.get("peer_verification")' 2>/dev/null || echo "?")
    echo "$side: peer_verification $level"
    [[ $level == keyVerified ]] || nbs_fail "the $side reports peer_verification $level, not keyVerified"
done
peer=$(nbs_json "$out.server" 'j.get("peer_name")' 2>/dev/null || echo "?")
[[ $peer == "$client_name" ]] || nbs_fail "the server names its peer $peer, not $client_name"
if nbs_check "$out" "$bytes" "$NBS_CRC" "$NBS_SRC" && ((NBS_FAILS == 0)); then
    echo "PASS key-verified: impostor and wrong pin refused, the genuine session keyVerified on both ends"
    exit 0
fi
echo "FAIL key-verified: $NBS_FAILS failed check(s)"
exit 1

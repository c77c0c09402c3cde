#!/usr/bin/env bash
# What a user sees for each mistake, on the real topology: every case must exit non-zero and print what happened
# and a hint (what to try). Cases: an unknown name (the namespaces reach no DNS server, so nothing leaves them), a
# name the listener does not serve, no usable address pair (an IPv6-only client towards an IPv4 literal), a port
# where nothing listens, a port already in use, and demo.sh run without root (no `ip netns`).
# Env: NBS_BIN.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

export NBS_TIMEOUT=${NBS_TIMEOUT:-30}
nbs_scenario_start

port=$(nbs_port)
spid=""
nbs_serve_bg spid "$port" "$NBS_TMP/srv" --sink --no-control
other=$((port + 1))

# expect NAME WANTED_MESSAGE WANTED_HINT COMMAND...: run COMMAND, which must fail with both texts on stderr.
expect() {
    local name=$1 message=$2 hint=$3 rc=0
    shift 3
    "$@" >"$NBS_TMP/$name.out" 2>"$NBS_TMP/$name.err" </dev/null || rc=$?
    echo "--- $name (exit $rc)"
    cat "$NBS_TMP/$name.err"
    ((rc != 0)) || nbs_fail "$name: exit status 0"
    grep -qF -- "$message" "$NBS_TMP/$name.err" || nbs_fail "$name: no '$message' on stderr"
    grep -q -- "hint: .*$hint" "$NBS_TMP/$name.err" || nbs_fail "$name: no hint '$hint'"
}

cli() { nbs_c timeout 20 "$NBS_BIN" "$@" --no-control; }
expect unknown-name "cannot resolve 'nowhere.nbs.test'" "check the name" \
    cli connect --name "$NBS_CLIENT_NAME" nowhere.nbs.test:"$port" --bytes 1
expect refused-name "refused" "serves another name" \
    cli connect --name "$NBS_CLIENT_NAME" "${NBS_S4[1]}:$port" --bytes 1
expect no-address-pair "no usable (local, remote) address pair" "same family" \
    cli connect --name "$NBS_CLIENT_NAME" "${NBS_S4[1]}:$port" --bytes 1 --local "${NBS_C6[1]}"
expect wrong-port "cannot reach '$NBS_SERVER_NAME'" "is the port right" \
    cli connect --name "$NBS_CLIENT_NAME" "$NBS_SERVER_NAME:$other" --bytes 1
expect port-in-use "in use" "pick another --port" \
    nbs_s timeout 20 "$NBS_BIN" serve --name "$NBS_SERVER_NAME" --port "$port" --sink --no-control
if command -v setpriv >/dev/null; then
    expect no-privileges "needs root" "sudo" \
        setpriv --reuid=65534 --regid=65534 --clear-groups env NBS_BIN="$NBS_BIN" bash "$NBS_LIB_DIR/demo.sh"
else
    echo "--- no-privileges: skipped (no setpriv)"
fi

kill "$spid" 2>/dev/null || true
if ((NBS_FAILS)); then
    echo "FAIL cli-errors: $NBS_FAILS check(s) failed"
    exit 1
fi
echo "PASS cli-errors: every mistake explained, with a hint and a non-zero exit"

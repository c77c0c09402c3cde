#!/usr/bin/env bash
# TCP Fast Open: both hosts allow it (tcp_fastopen=3, lib.sh). Three sessions in a row, each sending 256 KiB
# over two paths: the first fetches the server's cookies, so the OPEN and JOINs of the next two must go in
# their SYNs (the kernel's TcpExtTCPFastOpenActive on the client and TcpExtTCPFastOpenPassive on the server
# rise by at least 2 each), and every session's bytes arrive intact. Then one more session with
# `--no-fast-open`: neither counter may move. Env: NBS_TIMEOUT (s, default 120), NBS_BIN.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=$((256 * 1024))

nbs_scenario_start --rate 0

ok=1
# session N [CONNECT ARGS...]: one transfer, checked.
session() {
    local n=$1 spid="" cpid="" crc=0 src=0 port out
    shift
    port=$(nbs_port)
    out=$NBS_TMP/s$n
    nbs_serve_bg spid "$port" "$out" --sink
    nbs_connect_bg cpid "$port" "$out" "$bytes" --policy aggregate "$@"
    nbs_wait_rc crc "$cpid"
    nbs_wait_rc src "$spid"
    nbs_check "$out" "$bytes" "$crc" "$src" || ok=0
}

session 1
active0=$(nbs_tcp_ext "$NBS_NS_C" TCPFastOpenActive) passive0=$(nbs_tcp_ext "$NBS_NS_S" TCPFastOpenPassive)
session 2
session 3
active=$(($(nbs_tcp_ext "$NBS_NS_C" TCPFastOpenActive) - active0)) passive=$(($(nbs_tcp_ext "$NBS_NS_S" TCPFastOpenPassive) - passive0))
echo "sessions 2 and 3: $active connections with data in the SYN accepted (client), $passive accepted from a SYN (server)"
if ((active < 2 || passive < 2)); then
    nbs_fail "Fast Open was not used: client TCPFastOpenActive +$active, server TCPFastOpenPassive +$passive (want 2 or more each)"
    ok=0
fi

active0=$(nbs_tcp_ext "$NBS_NS_C" TCPFastOpenActive) passive0=$(nbs_tcp_ext "$NBS_NS_S" TCPFastOpenPassive)
session 4 --no-fast-open
active=$(($(nbs_tcp_ext "$NBS_NS_C" TCPFastOpenActive) - active0)) passive=$(($(nbs_tcp_ext "$NBS_NS_S" TCPFastOpenPassive) - passive0))
echo "with --no-fast-open: client TCPFastOpenActive +$active, server TCPFastOpenPassive +$passive"
if ((active != 0 || passive != 0)); then
    nbs_fail "--no-fast-open still sent data in a SYN"
    ok=0
fi

if ((ok)); then
    echo "PASS fast-open"
else
    echo "FAIL fast-open"
    exit 1
fi

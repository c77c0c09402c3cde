#!/usr/bin/env bash
# Aggregation benchmark: the same bulk transfer, in one run, on one topology (two paths, tbf on both ends):
#   tcp    plain TCP over path 1 alone                     (reference: ~9.6 Mbit/s at 10 Mbit/s)
#   mptcp  kernel MPTCP, subflow endpoint on the client's second address (reference: 15-18 Mbit/s)
#   nbs    nbs-mobility serve --sink / connect --policy aggregate (skipped if NBS_BIN is missing); it runs a
#          subflow per address pair of a family, so two per path here (IPv4 and IPv6)
#   nbs-udp  the same on UDP subflows (--transport udp)
#   nbs-2sf  the same with --max-subflows 2: the first two subflows, in practice one per path, as MPTCP has
#          (not in the default set; bench.sh runs it, to show what the second subflow per path costs)
# Prints one JSON line per case on stdout, then a table. Goodput is the receiver's, from its accept to its last byte
# (goodput_from_first_byte_mbps: from its first byte, the figure before 2026-11-26 evening).
#
#   netns-scripts/bench-aggregation.sh [--rate MBIT|A+B] [--bytes N] [--cases tcp,mptcp,nbs,nbs-2sf,nbs-udp] [--srcroute]
# --rate A+B gives path 1 A and path 2 B Mbit/s (unequal paths); percent_of_sum is of A+B.
# --srcroute adds per-source-address policy routing on both hosts (see lib.sh), so every subflow leaves by
# the interface that owns its source address, cross pairs included.
# Env: NBS_BIN (default .build/debug/nbs-mobility), NBS_BENCH_TIMEOUT (s per case, default 120).
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/lib.sh"

rate=10
bytes=$((16 * 1024 * 1024))
cases=tcp,mptcp,nbs
srcroute=0
while (($#)); do
    case $1 in
        --rate) rate=$2; shift 2 ;;
        --bytes) bytes=$2; shift 2 ;;
        --cases) cases=$2; shift 2 ;;
        --srcroute) srcroute=1; shift ;;
        -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
        *) nbs_die "unknown argument $1" ;;
    esac
done
tmo=${NBS_BENCH_TIMEOUT:-120}
xfer=$NBS_LIB_DIR/tools/mptcp_xfer.py

nbs_require_netns
nbs_cleanup_on_exit
nbs_tmpdir
topo_args=(--rate "$rate")
((srcroute)) && topo_args+=(--srcroute)
nbs_topology_create "${topo_args[@]}"

# Kernel MPTCP: two subflows allowed on both sides, the client's second address is a subflow endpoint.
for ns in "$NBS_NS_C" "$NBS_NS_S"; do
    ip -n "$ns" mptcp limits set subflow 2 add_addr_accepted 2
done
# Without --srcroute the endpoint is bound to nbs2 so that its subflow (198.51.100.1 -> 192.0.2.2, a cross
# pair) leaves by nbs2. With --srcroute the routing does that, and a bound subflow would drop the server's
# answers, which come back by the interface of the server's source address (nbs1).
if ((srcroute)); then
    ip -n "$NBS_NS_C" mptcp endpoint add "${NBS_C4[2]}" subflow
else
    ip -n "$NBS_NS_C" mptcp endpoint add "${NBS_C4[2]}" dev "$NBS_IF_2" subflow
fi

ROWS=()
FAILED=0
listen_transport=tcp

# record CASE SERVER_JSON CLIENT_RC SERVER_RC TX1 TX2 [NOTE]
record() {
    local name=$1 sj=$2 crc=$3 src=$4 tx1=$5 tx2=$6 line
    line=$(python3 - "$name" "$sj" "$crc" "$src" "$tx1" "$tx2" "$rate" "$bytes" "$srcroute" "$(nbs_rate_sum "$rate")" <<'EOF'
import json, sys
name, sj, crc, src, tx1, tx2, rate, size, srcroute, rate_sum = sys.argv[1:]
j = {}
try:
    lines = [l for l in open(sj).read().splitlines() if l.strip()]
    j = json.loads(lines[-1]) if lines else {}
except (OSError, ValueError):
    pass
ok = crc == "0" and src == "0" and j.get("bytes") == int(size)
# Goodput from the receiver's accept to its last byte, so that a start-up stall counts (from the first
# byte, a stall before it shortened the time: one NBS run read 108 % of the sum).
g = float(j.get("goodput_since_start_mbps") or 0)
print(json.dumps({
    "case": name, "ok": ok, "bytes": j.get("bytes"),
    "seconds": j.get("seconds_since_start"), "goodput_mbps": round(g, 2),
    "goodput_from_first_byte_mbps": j.get("goodput_mbps"),
    "percent_of_sum": round(100 * g / float(rate_sum), 1) if float(rate_sum) else None,
    "subflows_max": j.get("subflows_max"), "max_stall_ms": j.get("max_stall_ms"),
    "client_tx_bytes_path1": int(tx1), "client_tx_bytes_path2": int(tx2),
    "rate": rate, "rate_sum_mbps": float(rate_sum), "srcroute": srcroute == "1",
    "exit_codes": {"client": int(crc), "server": int(src)},
}))
EOF
    )
    echo "$line"
    ROWS+=("$line")
    [[ $line == *'"ok": true'* ]] || FAILED=1
}

# run_case NAME PORT -- SERVER_CMD... -- CLIENT_CMD...
run_case() {
    local name=$1 port=$2 sp crc=0 src a1 a2 b1 b2
    shift 3
    local -a scmd=() ccmd=()
    while [[ $1 != -- ]]; do scmd+=("$1"); shift; done
    shift
    ccmd=("$@")
    nbs_log "case $name: ${ccmd[*]}"
    nbs_bg sp "$NBS_NS_S" "$tmo" "$NBS_TMP/$name.server" "$NBS_TMP/$name.server.err" "${scmd[@]}"
    nbs_wait_listen "$NBS_NS_S" "$port" 10 "$listen_transport"
    a1=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_1"); a2=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_2")
    nbs_c timeout -k 5 "$tmo" "${ccmd[@]}" >"$NBS_TMP/$name.client" 2>"$NBS_TMP/$name.client.err" || crc=$?
    nbs_wait_rc src "$sp"
    b1=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_1"); b2=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_2")
    if [[ $crc != 0 || $src != 0 ]]; then
        nbs_log "case $name: client exit $crc, server exit $src"
        tail -n 5 "$NBS_TMP/$name.client.err" "$NBS_TMP/$name.server.err" >&2 || true
    fi
    record "$name" "$NBS_TMP/$name.server" "$crc" "$src" $((b1 - a1)) $((b2 - a2))
}

for c in ${cases//,/ }; do
    port=$(nbs_port)
    case $c in
        tcp)
            run_case tcp "$port" -- python3 "$xfer" server --bind "${NBS_S4[1]}" --port "$port" --proto tcp \
                --timeout "$tmo" -- python3 "$xfer" client --connect "${NBS_S4[1]}" --port "$port" --proto tcp \
                --bytes "$bytes" --timeout "$tmo"
            ;;
        mptcp)
            run_case mptcp "$port" -- python3 "$xfer" server --port "$port" --proto mptcp --timeout "$tmo" \
                -- python3 "$xfer" client --connect "${NBS_S4[1]}" --port "$port" --proto mptcp \
                --bytes "$bytes" --timeout "$tmo"
            ;;
        nbs | nbs-2sf | nbs-udp)
            if [[ ! -x $NBS_BIN ]]; then
                nbs_log "case $c: skipped, NBS binary not found: $NBS_BIN (run 'swift build')"
                continue
            fi
            limit=()
            [[ $c == nbs-2sf ]] && limit=(--max-subflows 2)
            listen_transport=tcp
            [[ $c == nbs-udp ]] && listen_transport=udp
            run_case "$c" "$port" -- "$NBS_BIN" serve --name "$NBS_SERVER_NAME" --port "$port" --sink --once --json \
                --transport "$listen_transport" -- "$NBS_BIN" connect --name "$NBS_CLIENT_NAME" "$NBS_SERVER_NAME:$port" \
                --bytes "$bytes" --policy aggregate --json --transport "$listen_transport" "${limit[@]}"
            listen_transport=tcp
            ;;
        *) nbs_die "unknown case $c" ;;
    esac
done

python3 - "${ROWS[@]}" <<'EOF'
import json, sys
rows = [json.loads(a) for a in sys.argv[1:]]
if rows:
    print()
    print("%-8s %4s %10s %8s %8s %9s %12s %12s" % ("case", "ok", "Mbit/s", "% sum", "seconds", "subflows",
                                                   "tx path1", "tx path2"))
    for r in rows:
        print("%-8s %4s %10.2f %8s %8s %9s %12d %12d" % (
            r["case"], "yes" if r["ok"] else "NO", r["goodput_mbps"], r["percent_of_sum"], r["seconds"],
            r["subflows_max"], r["client_tx_bytes_path1"], r["client_tx_bytes_path2"]))
EOF
exit "$FAILED"

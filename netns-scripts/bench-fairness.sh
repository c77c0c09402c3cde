#!/usr/bin/env bash
# Fairness at one bottleneck: an NBS session and a plain TCP flow (the kernel's, python's sockets) share one
# tbf-limited path (path 1 of the base topology, --rate Mbit/s, 50 ms of queue) for --seconds; each
# receiver logs its bytes per 100 ms, and the share each got is measured over the middle of the run (from
# 3 s, once both have left slow start, to 3 s before the TCP flow stops). Cases:
#   nbs-udp  NBS on one UDP subflow (NewReno with pacing, in userspace) against TCP
#   nbs-tcp  NBS on one TCP subflow (the kernel's congestion control) against TCP
#   tcp      two plain TCP flows: the reference for what "fair" looks like here
# The competing TCP flows use --cc (set per socket; default: the host's, e.g. bbr; cubic is the usual Linux
# default elsewhere). NBS's own TCP subflows keep the host's default.
# Prints one JSON line per case (Mbit/s of each flow, NBS's share of the sum, Jain's index), then a table.
#
# The case's flow starts a few tens of ms before the competing TCP flow; --tcp-first turns that round (at
# these sub-millisecond base RTTs the first of two loss-based flows can keep most of a deep queue for a
# long time, which the tcp case shows).
#
#   netns-scripts/bench-fairness.sh [--cases nbs-udp,nbs-tcp,tcp] [--rate MBIT] [--seconds S] [--cc NAME] [--tcp-first]
# Env: NBS_BIN (default .build/debug/nbs-mobility).
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/lib.sh"

cases=nbs-udp,nbs-tcp,tcp
rate=10
seconds=20
cc=""
tcp_first=0
while (($#)); do
    case $1 in
        --cases) cases=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --cc) cc=$2; shift 2 ;;
        --tcp-first) tcp_first=1; shift ;;
        -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
        *) nbs_die "unknown argument $1" ;;
    esac
done
((seconds >= 10 && seconds <= 120)) || nbs_die "--seconds takes 10..120"
xfer=$NBS_LIB_DIR/tools/mptcp_xfer.py
tmo=$((seconds + 60))

nbs_require_netns
nbs_cleanup_on_exit
nbs_tmpdir
nbs_topology_create --rate "$rate"
used_cc=${cc:-$(nbs_c sysctl -n net.ipv4.tcp_congestion_control)}
cc_arg=()
[[ -n $cc ]] && cc_arg=(--cc "$cc")
# Enough for NBS to outlast the TCP flow even with all of the path.
nbs_bytes=$((rate * 1000 * 1000 / 8 * (seconds + 5)))

# run_case NAME: the competing TCP flow and the case's other flow, started together on path 1.
run_case() {
    local name=$1 tport nport tsp tcp_pid osp ocp rc=0
    start_tcp_client() {
        nbs_bg tcp_pid "$NBS_NS_C" "$tmo" "$NBS_TMP/$name.tcp.client" "$NBS_TMP/$name.tcp.client.err" \
            python3 "$xfer" client --connect "${NBS_S4[1]}" --port "$tport" --proto tcp --duration "$seconds" --timeout "$tmo" \
            "${cc_arg[@]}"
    }
    tport=$(nbs_port) nport=$(nbs_port)
    nbs_bg tsp "$NBS_NS_S" "$tmo" "$NBS_TMP/$name.tcp.server" "$NBS_TMP/$name.tcp.server.err" \
        python3 "$xfer" server --bind "${NBS_S4[1]}" --port "$tport" --proto tcp --timeout "$tmo" --timeline "$NBS_TMP/$name.tcp.tl"
    nbs_wait_listen "$NBS_NS_S" "$tport"
    if ((tcp_first)); then
        start_tcp_client
        sleep 0.5
    fi
    case $name in
        tcp)
            nbs_bg osp "$NBS_NS_S" "$tmo" "$NBS_TMP/$name.other.server" "$NBS_TMP/$name.other.server.err" \
                python3 "$xfer" server --bind "${NBS_S4[1]}" --port "$nport" --proto tcp --timeout "$tmo" \
                --timeline "$NBS_TMP/$name.other.tl"
            nbs_wait_listen "$NBS_NS_S" "$nport"
            nbs_bg ocp "$NBS_NS_C" "$tmo" "$NBS_TMP/$name.other.client" "$NBS_TMP/$name.other.client.err" \
                python3 "$xfer" client --connect "${NBS_S4[1]}" --port "$nport" --proto tcp --duration "$((seconds + 5))" --timeout "$tmo" \
                "${cc_arg[@]}"
            ;;
        nbs-udp | nbs-tcp)
            local transport=${name#nbs-}
            nbs_bg osp "$NBS_NS_S" "$tmo" "$NBS_TMP/$name.other.server" "$NBS_TMP/$name.other.server.err" \
                "$NBS_BIN" serve --name "$NBS_SERVER_NAME" --port "$nport" --sink --once --json --view off --no-control \
                --transport "$transport" --timeline "$NBS_TMP/$name.other.tl"
            nbs_wait_listen "$NBS_NS_S" "$nport" 10 "$transport"
            # One subflow, from path 1's IPv4 address: the same bottleneck as the TCP flow.
            nbs_bg ocp "$NBS_NS_C" "$tmo" "$NBS_TMP/$name.other.client" "$NBS_TMP/$name.other.client.err" \
                "$NBS_BIN" connect --name "$NBS_CLIENT_NAME" "$NBS_SERVER_NAME:$nport" --bytes "$nbs_bytes" --json \
                --view off --no-control --transport "$transport" --local "${NBS_C4[1]}" --max-subflows 1
            ;;
        *) nbs_die "unknown case $name" ;;
    esac
    ((tcp_first)) || start_tcp_client
    nbs_wait_rc rc "$tcp_pid"
    nbs_wait_rc rc "$ocp"
    nbs_wait_rc rc "$tsp"
    nbs_wait_rc rc "$osp"
    python3 - "$name" "$NBS_TMP/$name.tcp.tl" "$NBS_TMP/$name.other.tl" "$seconds" "$rate" "$used_cc" "$tcp_first" <<'PY'
import json, sys
name, tcp_tl, other_tl, seconds, rate, cc, tcp_first = sys.argv[1:]
seconds, rate = float(seconds), float(rate)

def rate_in(path, start, end):
    total = 0
    try:
        for line in open(path):
            t, b = line.split()
            if start * 1000 <= float(t) < end * 1000:
                total += int(b)
    except OSError:
        return None
    return total * 8 / (end - start) / 1e6

start, end = 3.0, seconds - 3.0
t, o = rate_in(tcp_tl, start, end), rate_in(other_tl, start, end)
row = {"bench": "fairness", "case": name, "kernel_cc": cc, "tcp_first": tcp_first == "1", "rate_mbps": rate, "window_s": [start, end],
       "tcp_mbps": round(t, 2) if t is not None else None, "other_mbps": round(o, 2) if o is not None else None}
if t is not None and o is not None and t + o > 0:
    row["other_share"] = round(o / (t + o), 3)
    row["jain_index"] = round((t + o) ** 2 / (2 * (t * t + o * o)), 3)
    row["utilisation"] = round((t + o) / rate, 3)
print(json.dumps(row))
PY
}

rows=()
for c in ${cases//,/ }; do
    nbs_log "case $c: ${seconds}s against one TCP flow on ${rate} Mbit/s (kernel cc $used_cc)"
    rows+=("$(run_case "$c")")
    echo "${rows[-1]}"
done
python3 - "${rows[@]}" <<'PY'
import json, sys
print("\n%-8s %-6s %-9s %10s %12s %12s %7s %11s" % ("case", "cc", "first", "TCP Mb/s", "other Mb/s", "other share", "Jain", "utilisation"))
for line in sys.argv[1:]:
    r = json.loads(line)
    print("%-8s %-6s %-9s %10s %12s %12s %7s %11s" % (r["case"], r["kernel_cc"], "tcp" if r["tcp_first"] else "other",
          r.get("tcp_mbps"), r.get("other_mbps"), r.get("other_share"), r.get("jain_index"), r.get("utilisation")))
PY

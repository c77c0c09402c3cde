#!/usr/bin/env bash
# A narrated demo: two multihomed hosts in network namespaces, two 10 Mbit/s paths, one NBS session opened
# by name that uses both, and three things happening to the client while it streams:
#   1. a link failure (path 1 down),
#   2. an address move while path 1 is still down (path 2 renumbered: for half a second the client has no
#      address at all, so the session waits, then joins from the new address),
#   3. the return of path 1.
# The client's own view (plain lines: its events as they happen and one status line a second) is shown as it
# runs, with `nbs-mobility status` from the host once; at the end both sides' summaries and the checksums.
# Needs root (it creates namespaces). Env: NBS_BIN, NBS_RATE (default 10), NBS_BYTES (default 32 MiB),
#      NBS_DEMO_POLICY (default aggregate), NBS_TIMEOUT (s, default 120).
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/lib.sh"

rate=${NBS_RATE:-10}
bytes=${NBS_BYTES:-$((32 * 1024 * 1024))}
policy=${NBS_DEMO_POLICY:-aggregate}
export NBS_TIMEOUT=${NBS_TIMEOUT:-120}

if [[ -t 1 ]]; then say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }; else say() { printf '\n==> %s\n' "$*"; }; fi

if ! nbs_can_netns; then
    echo "demo.sh: cannot create network namespaces: it needs root and iproute2 ('ip netns')." >&2
    echo "  hint: run it as root, e.g. sudo $0 (the packages come from netns-scripts/install.sh)" >&2
    exit 1
fi
if [[ ! -x $NBS_BIN ]]; then
    echo "demo.sh: the NBS binary is not at $NBS_BIN." >&2
    echo "  hint: swift build (or netns-scripts/setup.sh, which installs, builds and runs this demo)" >&2
    exit 1
fi
nbs_cleanup_on_exit
nbs_tmpdir

say "Two hosts (network namespaces) joined by two paths, tbf ${rate} Mbit/s on each end"
nbs_topology_create --rate "$rate"
echo "client: $NBS_NS_C    server: $NBS_NS_S"
nbs_c ip -br addr show scope global

say "Names come from /etc/netns/NS/hosts; the client resolves the server to all its addresses"
nbs_c getent ahosts "$NBS_SERVER_NAME" | awk '$2 == "STREAM" {print "  " $1}'

spid="" cpid="" crc=0 src=0 # set by nbs_serve_bg, nbs_connect_bg, nbs_wait_rc
port=$(nbs_port)
out=$NBS_TMP/demo
control=$NBS_TMP/control
mkdir -m 700 "$control"
export NBS_CONTROL_DIR=$control
say "Server: nbs-mobility serve --name $NBS_SERVER_NAME --port $port --sink"
nbs_serve_bg spid "$port" "$out" --sink

say "Client: nbs-mobility connect --name $NBS_CLIENT_NAME $NBS_SERVER_NAME:$port --bytes $bytes --policy $policy --view lines"
echo "(its lines follow, prefixed 'client |': events as they happen, and once a second the session and each subflow's send/recv Mbit/s)"
t0=$(date +%s.%N)
nbs_connect_bg cpid "$port" "$out" "$bytes" --policy "$policy" --view lines
tail --pid="$cpid" -n +1 -F "$out.client" 2>/dev/null | grep --line-buffered -v '^{' | sed -u 's/^/  client | /' &
nbs_on_exit "kill $! 2>/dev/null"

running() { kill -0 "$cpid" 2>/dev/null; }
step() { # step DELAY_S NARRATION COMMAND...: after DELAY_S, if the transfer still runs, narrate and act.
    local delay=$1 text=$2
    shift 2
    sleep "$delay"
    running || { say "(the transfer already ended; skipping: $text)"; return 0; }
    [[ -z $text ]] || say "$text"
    "$@"
}
renumber_path2() {
    ip -n "$NBS_NS_C" addr del "${NBS_C4[2]}/24" dev nbs2
    ip -n "$NBS_NS_C" addr del "${NBS_C6[2]}/64" dev nbs2
    sleep 0.5
    ip -n "$NBS_NS_C" addr add 198.51.100.21/24 dev nbs2
    ip -n "$NBS_NS_C" addr add 2001:db8:2::21/64 dev nbs2 nodad
}
show_status() {
    say "Meanwhile, from the host: nbs-mobility status (it sees the processes inside both namespaces)"
    "$NBS_BIN" status | sed 's/^/  /'
}

step 2 "Link failure: the client's path-1 link ($NBS_IF_1) goes down; netlink tells the session at once" nbs_link_down 1 c
step 1 "" show_status
step 2 "Address move: path 1 is still down and path 2 is renumbered (${NBS_C4[2]} -> 198.51.100.21, ${NBS_C6[2]} -> 2001:db8:2::21). For 0.5 s the client has no address: the session waits, then joins from the new one" renumber_path2
step 3 "Return: path 1 comes back up; the session announces it and joins over it again" nbs_link_up 1 c

nbs_wait_rc crc "$cpid"
nbs_wait_rc src "$spid"
t1=$(date +%s.%N)
sleep 0.2

say "Summary (client exit $crc, server exit $src; full JSON reports: connect/serve --json)"
python3 - "$out.client" "$out.server" <<'PY'
import json, sys
def last(path):
    lines = [l for l in open(path, encoding="utf-8", errors="replace").read().splitlines() if l.strip()]
    return json.loads(lines[-1]) if lines else {}
c, s = last(sys.argv[1]), last(sys.argv[2])
print("  client sent     %d bytes, sha256 %s" % (c.get("bytes", 0), c.get("sha256", "?")))
print("  server received %d bytes, sha256 %s  %s" % (s.get("bytes", 0), s.get("sha256", "?"), "(equal)" if c.get("sha256") == s.get("sha256") else "(DIFFERENT)"))
print("  goodput %.2f Mbit/s; %d subflows in all, at most %d at once; %d bytes reinjected" % (
    s.get("goodput_mbps", 0), len(c.get("subflows") or []), c.get("subflows_max", 0), c.get("reinjected_bytes", 0)))
print("  receiver's longest stall %.0f ms at %.2f s" % (s.get("max_stall_ms", 0), s.get("max_stall_at_s") or 0))
for f in c.get("subflows") or []:
    print("    %-15s -> %-15s %-5s sent %9d B  %s" % (f.get("local"), f.get("remote"), f.get("interface", "-"), f.get("bytes_sent", 0), f.get("state")))
PY

say "Verdict"
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "wall time %.1f s\n", b - a }'
nbs_check "$out" "$bytes" "$crc" "$src" --min-active-subflows 2

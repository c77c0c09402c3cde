#!/usr/bin/env bash
# A narrated demo: two multihomed hosts in namespaces, two 10 Mbit/s paths, one NBS session by name that uses
# both. The client's path-1 link goes down 1.5 s into the transfer and comes back 3 s later
# (NBS_DEMO_FAILOVER=0 skips that).
# Env: NBS_BIN, NBS_RATE (default 10), NBS_BYTES (default 32 MiB), NBS_DEMO_FAILOVER (1 default, 0 to skip),
#      NBS_DEMO_POLICY (default aggregate), NBS_TIMEOUT (s, default 120).
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/lib.sh"

rate=${NBS_RATE:-10}
bytes=${NBS_BYTES:-$((32 * 1024 * 1024))}
policy=${NBS_DEMO_POLICY:-aggregate}

if [[ -t 1 ]]; then say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }; else say() { printf '\n==> %s\n' "$*"; }; fi

nbs_require_netns
nbs_cleanup_on_exit
nbs_tmpdir

say "Creating two hosts (network namespaces) joined by two paths, tbf ${rate} Mbit/s on each end"
nbs_topology_create --rate "$rate"
echo "client: $NBS_NS_C    server: $NBS_NS_S"
nbs_c ip -br addr show scope global

say "Names come from /etc/netns/NS/hosts; the client resolves the server to all its addresses"
nbs_c getent ahosts "$NBS_SERVER_NAME" | awk '$2 == "STREAM" {print "  " $1}'

if [[ ! -x $NBS_BIN ]]; then
    say "NBS binary not found at $NBS_BIN: build it with 'swift build' (or netns-scripts/setup.sh). Stopping here."
    exit 1
fi

spid="" cpid="" crc=0 src=0 # set by nbs_serve_bg, nbs_connect_bg, nbs_wait_rc
port=$(nbs_port)
out=$NBS_TMP/demo
say "Server: nbs-mobility serve --name $NBS_SERVER_NAME --port $port --sink"
nbs_serve_bg spid "$port" "$out" --sink

say "Client: nbs-mobility connect --name $NBS_CLIENT_NAME $NBS_SERVER_NAME:$port --bytes $bytes --policy $policy"
t0=$(date +%s.%N)
nbs_connect_bg cpid "$port" "$out" "$bytes" --policy "$policy"

failover=${NBS_DEMO_FAILOVER:-1}
if [[ $failover == 1 ]]; then
    sleep 1.5
    say "Failover: taking the client's path-1 link ($NBS_IF_1) down mid-transfer (netlink tells the session at once)"
    nbs_link_down 1 c
    # The link comes back while the per-second counters below run.
    (sleep 3 && nbs_link_up 1 c && echo && echo "==> Return: path-1 link up again; the session announces and re-joins it") &
    nbs_on_exit "kill $! 2>/dev/null"
fi

# While it runs, show the per-path counters once a second (bounded by the transfer's own timeout).
prev1=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_1") prev2=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_2")
for ((i = 0; i < ${NBS_TIMEOUT:-120}; i++)); do
    kill -0 "$cpid" 2>/dev/null || break
    sleep 1
    now1=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_1") now2=$(nbs_tx_bytes "$NBS_NS_C" "$NBS_IF_2")
    awk -v t=$((i + 1)) -v a=$((now1 - prev1)) -v b=$((now2 - prev2)) \
        'BEGIN { printf "  t=%2ds  path1 %6.2f Mbit/s   path2 %6.2f Mbit/s\n", t, a * 8 / 1e6, b * 8 / 1e6 }'
    prev1=$now1 prev2=$now2
done
nbs_wait_rc crc "$cpid"
nbs_wait_rc src "$spid"
t1=$(date +%s.%N)

say "Client summary (exit $crc)"
nbs_json_pretty "$out.client"
say "Server summary (exit $src)"
nbs_json_pretty "$out.server"

say "Verdict"
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "wall time %.1f s\n", b - a }'
min_active=2
[[ $failover == 1 ]] && min_active=1
nbs_check "$out" "$bytes" "$crc" "$src" --min-active-subflows "$min_active"

#!/usr/bin/env bash
# Scale benchmark (issue 7) on loopback: no namespaces, every byte stays on lo.
#   idle  one `serve` holds --sessions idle sessions (default 10000), two subflows each: opened by --clients
#         `connect --hold` processes, each from its own two loopback addresses (127.0.0.2k+2, 127.0.0.2k+3) to
#         127.0.0.1 with --max-subflows 2, so every session has exactly two subflows. Reports the server's RSS
#         before and with the sessions held, memory per idle session, descriptors, open rate, and the server's
#         CPU while they idle; then checks that every session closed cleanly when the hold ended.
#   fair  --active sessions (default 1000) from one client, started together (--start-together), each sending
#         for --duration seconds through one `serve --sink`; reports the spread of the server-side goodput per
#         session (min, median, max) and Jain's fairness index. On loopback the shared resource is the two
#         processes' CPU (two cores), which NBS's event loops divide between sessions.
#   churn --rounds R (default 10) of --churn N sessions (default 1000) from one client, each sending 1 KiB and
#         closing, through one `serve --sink`: the server's RSS after each round, and what it keeps per session
#         served (its RSS growth from the second round to the last over the sessions served meanwhile; aim:
#         about nothing, as a server runs for months).
# Prints a table and one JSON line per case on stdout.
#
#   netns-scripts/bench-scale.sh [--case idle|fair|churn|all] [--sessions N] [--clients K] [--hold S]
#                                [--active M] [--duration S] [--settle S] [--measure S] [--open-concurrency C]
#                                [--transport tcp|udp] [--client-loops N] [--rounds R] [--churn N]
# --settle: seconds between the last subflow up and the idle measurement (default 3); --measure: its length (10);
# --open-concurrency: opens in progress per client (16). --transport udp: UDP subflows, whose listener shares
# one socket per local address among all its subflows, so the server needs a handful of descriptors instead of
# two per session (the clients still hold one per subflow: --clients spreads them); subflows are counted from
# the clients' connected sockets. --client-loops N: event-loop threads per client process (default one per
# core): on a 2-core machine, two clients with two threads each leave the serve about 40 % of one core.
# Env: NBS_BIN (default .build/release/nbs-mobility), NBS_SERVE_BIN (the server's binary, default NBS_BIN: to
# measure an older server against the same clients), NBS_BENCH_TIMEOUT (s per process, default 600).
set -euo pipefail
# lib.sh defaults NBS_BIN to the debug build; scale figures are for the release build.
bin=${NBS_BIN:-.build/release/nbs-mobility}
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/lib.sh"

which_case=all
sessions=10000
clients=2
hold=40
active=1000
duration=10
measure=10
concurrency=16
settle=3
transport=tcp
client_loops=()
rounds=10
churn=1000
while (($#)); do
    case $1 in
        --case) which_case=$2; shift 2 ;;
        --sessions) sessions=$2; shift 2 ;;
        --clients) clients=$2; shift 2 ;;
        --hold) hold=$2; shift 2 ;;
        --active) active=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --measure) measure=$2; shift 2 ;;
        --open-concurrency) concurrency=$2; shift 2 ;;
        --settle) settle=$2; shift 2 ;;
        --transport) transport=$2; shift 2 ;;
        --client-loops) client_loops=(--event-loops "$2"); shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --churn) churn=$2; shift 2 ;;
        -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
        *) nbs_die "unknown argument $1" ;;
    esac
done
[[ $which_case =~ ^(idle|fair|churn|all)$ ]] || nbs_die "--case must be idle, fair, churn or all"
((rounds >= 2 && rounds <= 1000)) || nbs_die "--rounds must be 2...1000"
((churn >= 1 && churn <= 10000)) || nbs_die "--churn must be 1...10000"
[[ $transport =~ ^(tcp|udp)$ ]] || nbs_die "--transport must be tcp or udp"
((clients >= 1 && clients <= 60)) || nbs_die "--clients must be 1...60 (two loopback addresses each)"
NBS_BIN=$bin
serve_bin=${NBS_SERVE_BIN:-$NBS_BIN}
[[ -x $NBS_BIN && -x $serve_bin ]] || nbs_die "no binary at $NBS_BIN / $serve_bin (swift build -c release --product nbs-mobility)"
tmo=${NBS_BENCH_TIMEOUT:-600}
hz=$(getconf CLK_TCK)

nbs_cleanup_on_exit
nbs_tmpdir
export NBS_CONTROL_DIR=$NBS_TMP/control

# Over TCP every session holds two descriptors in the server and two in its client; over UDP two in its client
# only. Raise the limit for this shell and the processes it starts (root may raise the hard limit too).
# Raising the hard limit needs CAP_SYS_RESOURCE, which some containers withhold even from root.
most=$active
[[ $which_case == churn ]] && most=$churn
[[ $which_case == fair || $which_case == churn ]] || most=$((sessions > active ? sessions : active))
need=$((2 * most + 64)) who="the server"
[[ $transport == udp ]] && need=$((2 * (most + clients - 1) / clients + 64)) who="each client"
if (($(ulimit -Hn) < need)) && ! ulimit -Hn "$need" 2>/dev/null; then
    nbs_die "$who needs $need descriptors and the hard limit is $(ulimit -Hn) (no CAP_SYS_RESOURCE to raise it): at most --sessions $((($(ulimit -Hn) - 64) / 2)) here$([[ $transport == tcp ]] && echo " (over UDP the server needs only a few: --transport udp)")"
fi
ulimit -Sn "$(ulimit -Hn)"
nbs_log "descriptor limit $(ulimit -n)"

# start VAR NAME CMD...: CMD in the background, bounded by `timeout`, stdout/stderr to $NBS_TMP/NAME.{out,err};
# VAR gets the pid of `timeout`, which is killed (and so CMD) on exit.
start() {
    local -n _p=$1
    local name=$2
    shift 2
    timeout -k 5 "$tmo" "$@" >"$NBS_TMP/$name.out" 2>"$NBS_TMP/$name.err" </dev/null &
    _p=$!
    nbs_on_exit "nbs__kill_child $_p"
}
# The process `timeout` runs (the one to measure).
child_of() {
    local c="" i
    for ((i = 0; i < 50; i++)); do
        c=$(pgrep -P "$1" | head -n1 || true)
        [[ -n $c ]] && break
        sleep 0.1
    done
    [[ -n $c ]] || nbs_die "no child of $1"
    echo "$c"
}
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
anon_kib() { awk '/^RssAnon/ { print $2 }' "/proc/$1/status"; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 | wc -l; }
# Datagrams the kernel dropped at a full socket receive buffer, machine-wide (Udp RcvbufErrors): in the idle
# case's close every one of them was at the serve's shared socket (/proc/net/udp's drops column).
udp_receive_buffer_drops() { awk '/^Udp:/ { if (seen) print $6; seen = 1 }' /proc/net/snmp; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# Subflows up: the server's established TCP connections, or the clients' connected UDP sockets to the port.
established() {
    if [[ $transport == udp ]]; then ss -Hun state established "( dport = :$1 )" | wc -l; else ss -Htn state established "( sport = :$1 )" | wc -l; fi
}
wait_listen() {
    local i
    for ((i = 0; i < 150; i++)); do
        [[ -n $(if [[ $transport == udp ]]; then ss -Huan "sport = :$1"; else ss -Hltn "sport = :$1"; fi) ]] && return 0
        sleep 0.1
    done
    nbs_die "nothing listens on port $1"
}
# wait_for LIMIT_S CMD...: poll CMD every 0.5 s until it succeeds; false after LIMIT_S.
wait_for() {
    local limit=$1 i
    shift
    for ((i = 0; i < limit * 2; i++)); do
        "$@" && return 0
        sleep 0.5
    done
    return 1
}
start_server() { # start_server PIDVAR PORT NAME
    local -n _sp=$1
    local tp
    start tp "$3" "$serve_bin" serve --name localhost --port "$2" --sink --json --max-subflows 2 --transport "$transport"
    wait_listen "$2"
    _sp=$(child_of "$tp")
    server_timeout_pid=$tp
}

idle_case() {
    local port server server_timeout_pid="" per=$((sessions / clients)) k cpids=() rc rcs=0 t0 t1
    port=$(nbs_port)
    start_server server "$port" idle-server
    sleep 1
    local rss0 anon0 fds0
    rss0=$(rss_kib "$server") anon0=$(anon_kib "$server") fds0=$(fds "$server")
    nbs_log "idle: server pid $server: RSS $rss0 KiB (anon $anon0), $fds0 fds; opening $((per * clients)) sessions from $clients clients"
    t0=$(date +%s.%N)
    for ((k = 0; k < clients; k++)); do
        local cp
        start cp "idle-client$k" "$NBS_BIN" connect --name "client$k.scale.test" "localhost:$port" --sessions "$per" --hold "$hold" \
            --open-concurrency "$concurrency" --max-subflows 2 --local "127.0.0.$((2 * k + 2))" --local "127.0.0.$((2 * k + 3))" --json --no-control \
            --transport "$transport" "${client_loops[@]}"
        cpids+=("$cp")
    done
    local want=$((2 * per * clients))
    # Each client says when all its opens have ended (some may have failed); then the JOINs complete.
    all_opened() { (($(cat "$NBS_TMP"/idle-client*.err | grep -c "sessions open after") >= clients)); }
    wait_for "$((sessions / 20 + 60))" all_opened || nbs_die "the clients did not finish opening; see $NBS_TMP/idle-*.err"
    local last=-1 now
    for ((k = 0; k < 20; k++)); do
        now=$(established "$port")
        ((now >= want || now == last)) && break
        last=$now
        sleep 1
    done
    t1=$(date +%s.%N)
    cat "$NBS_TMP"/idle-client*.err | grep "sessions open after" >&2
    (($(established "$port") > 0)) || nbs_die "no subflow established; see $NBS_TMP/idle-*.err"
    local open_s rate
    open_s=$(echo "$t1 $t0" | awk '{ printf "%.2f", $1 - $2 }')
    rate=$(echo "$want $open_s" | awk '{ printf "%.0f", $1 / 2 / $2 }')
    nbs_log "idle: $(established "$port") of $want subflows established in ${open_s}s ($rate sessions/s); settling ${settle}s"
    sleep "$settle"
    local c0 c1 w0 w1 cc0=0 cc1=0 pid
    local client_pids=()
    for cp in "${cpids[@]}"; do client_pids+=("$(child_of "$cp")"); done
    c0=$(cpu_ticks "$server") w0=$(date +%s.%N)
    for pid in "${client_pids[@]}"; do cc0=$((cc0 + $(cpu_ticks "$pid"))); done
    sleep "$measure"
    c1=$(cpu_ticks "$server") w1=$(date +%s.%N)
    for pid in "${client_pids[@]}"; do cc1=$((cc1 + $(cpu_ticks "$pid"))); done
    local rss1 anon1 fds1 cpu_pct client_cpu_pct
    rss1=$(rss_kib "$server") anon1=$(anon_kib "$server") fds1=$(fds "$server")
    cpu_pct=$(echo "$c0 $c1 $w0 $w1 $hz" | awk '{ printf "%.1f", ($2 - $1) / $5 / ($4 - $3) * 100 }')
    client_cpu_pct=$(echo "$cc0 $cc1 $w0 $w1 $hz" | awk '{ printf "%.1f", ($2 - $1) / $5 / ($4 - $3) * 100 }')
    local held=$(($(established "$port") / 2))
    # One `status` over the control socket: it samples every session (and keeps the sample).
    local s0 s1 status_s status_sessions status_two rss2
    s0=$(date +%s.%N)
    "$NBS_BIN" status --json --socket "$NBS_CONTROL_DIR/$server.sock" >"$NBS_TMP/status.json" 2>"$NBS_TMP/status.err" || true
    s1=$(date +%s.%N)
    status_s=$(echo "$s1 $s0" | awk '{ printf "%.2f", $1 - $2 }')
    read -r status_sessions status_two < <(python3 -c '
import json, sys
try:
    j = json.loads(open(sys.argv[1]).read())
except Exception:
    print(0, 0); sys.exit()
s = j["sessions"]
print(len(s), sum(1 for x in s if sum(1 for f in x["subflows"] if f["state"] in ("active", "standby")) == 2))' "$NBS_TMP/status.json")
    rss2=$(rss_kib "$server")
    nbs_log "idle: waiting for the clients' hold (${hold}s after their last open) to end"
    local drops0 drops1
    drops0=$(udp_receive_buffer_drops)
    for cp in "${cpids[@]}"; do
        nbs_wait_rc rc "$cp"
        ((rc == 0)) || rcs=$((rcs + 1))
    done
    local closed completed rss3 fds3
    all_closed() { (($(grep -c '"completed":true' "$NBS_TMP/idle-server.out" || true) >= per * clients)); }
    wait_for 60 all_closed || true
    sleep 1
    completed=$(grep -c '"completed":true' "$NBS_TMP/idle-server.out" || true)
    drops1=$(udp_receive_buffer_drops)
    closed=$(cat "$NBS_TMP"/idle-client*.out | grep -c '"completed":true' || true)
    rss3=$(rss_kib "$server") fds3=$(fds "$server")
    nbs__kill_child "$server_timeout_pid"
    python3 - "$sessions" "$((per * clients))" "$held" "$open_s" "$rate" "$rss0" "$anon0" "$fds0" "$rss1" "$anon1" "$fds1" \
        "$cpu_pct" "$client_cpu_pct" "$measure" "$status_s" "$status_sessions" "$status_two" "$rss2" "$completed" "$closed" \
        "$rss3" "$fds3" "$rcs" "$transport" "$((drops1 - drops0))" <<'EOF'
import json, sys
a = sys.argv[1:]
(asked, opened, held, open_s, rate, rss0, anon0, fds0, rss1, anon1, fds1, cpu, ccpu, measure, status_s, st_n, st_two, rss2,
 completed, closed, rss3, fds3, rcs, transport, drops) = a
n = int(held) or 1
per = (int(rss1) - int(rss0)) / n
per_anon = (int(anon1) - int(anon0)) / n
j = {"case": "idle", "transport": transport, "sessions": int(opened), "held": int(held), "subflows_per_session": 2, "open_seconds": float(open_s),
     "sessions_per_s": int(rate), "server_rss_kib_before": int(rss0), "server_rss_kib_idle": int(rss1),
     "server_anon_kib_before": int(anon0), "server_anon_kib_idle": int(anon1),
     "kib_per_idle_session": round(per, 2), "anon_kib_per_idle_session": round(per_anon, 2),
     "server_fds_before": int(fds0), "server_fds_idle": int(fds1), "server_cpu_pct_idle": float(cpu),
     "clients_cpu_pct_idle": float(ccpu), "measure_s": float(measure), "status_seconds": float(status_s),
     "status_sessions": int(st_n), "status_sessions_with_2_up": int(st_two), "server_rss_kib_after_status": int(rss2),
     "server_completed": int(completed), "clients_completed": int(closed), "server_rss_kib_after_close": int(rss3),
     "server_fds_after_close": int(fds3), "clients_failed": int(rcs), "aim_kib_per_session": 64,
     "udp_receive_buffer_drops_at_close": int(drops),
     "met": per < 64 and int(completed) == int(opened) and int(rcs) == 0}
print(json.dumps(j, sort_keys=True))
print(f"idle: {j['held']} sessions x 2 subflows held by one serve: RSS {rss0} -> {rss1} KiB = {per:.1f} KiB per idle session "
      f"(anon {per_anon:.1f}; aim < 64), fds {fds0} -> {fds1}, server CPU while idle {cpu} % of a core, clients {ccpu} %",
      file=sys.stderr)
print(f"      opened in {open_s} s ({rate}/s); status: {st_n} sessions, {st_two} with 2 subflows up (active or standby), {status_s} s, RSS after "
      f"{rss2} KiB; closed: server {completed}, clients {closed} completed, RSS {rss3} KiB, fds {fds3}"
      + (f"; {drops} datagrams dropped at full UDP receive buffers meanwhile" if transport == "udp" else ""), file=sys.stderr)
EOF
}

fair_case() {
    local port server server_timeout_pid="" cp rc
    port=$(nbs_port)
    start_server server "$port" fair-server
    local c0 c1
    c0=$(cpu_ticks "$server")
    # A small send buffer: what a session has written when its time is up drains in well under a second.
    start cp fair-client "$NBS_BIN" connect --name client.scale.test "localhost:$port" --sessions "$active" --duration "$duration" \
        --start-together --send-buffer 64K --max-subflows 2 --local 127.0.0.2 --local 127.0.0.3 --json --no-control \
        --transport "$transport"
    nbs_wait_rc rc "$cp"
    all_done() { (($(grep -c '"completed"' "$NBS_TMP/fair-server.out" || true) >= active)); }
    wait_for 60 all_done || true
    c1=$(cpu_ticks "$server")
    nbs__kill_child "$server_timeout_pid"
    grep -h "sessions open" "$NBS_TMP/fair-client.err" >&2 || true
    python3 - "$NBS_TMP/fair-server.out" "$active" "$duration" "$rc" "$(((c1 - c0) * 1000 / hz))" <<'EOF'
import json, statistics, sys
path, active, duration, rc, server_cpu_ms = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
reports = []
for line in open(path, encoding="utf-8", errors="replace"):
    line = line.strip()
    if line.startswith("{"):
        try:
            reports.append(json.loads(line))
        except ValueError:
            pass
done = [r for r in reports if r.get("completed")]
# Each session's goodput over its own sending time (first to last delivery), and its bytes: with a common
# start and a common duration both should be equal for every session.
rates = sorted(r["goodput_mbps"] for r in done)
volumes = sorted(r["bytes"] for r in done)
def jain(xs):
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if xs and any(xs) else 0.0
j = {"case": "fair", "sessions": active, "completed": len(done), "client_rc": rc, "duration_s": duration,
     "goodput_mbps_min": round(rates[0], 3) if rates else 0, "goodput_mbps_median": round(statistics.median(rates), 3) if rates else 0,
     "goodput_mbps_max": round(rates[-1], 3) if rates else 0, "jain_goodput": round(jain(rates), 4),
     "bytes_min": volumes[0] if volumes else 0, "bytes_median": int(statistics.median(volumes)) if volumes else 0,
     "bytes_max": volumes[-1] if volumes else 0, "jain_bytes": round(jain(volumes), 4),
     "total_mbps": round(sum(volumes) * 8 / duration / 1e6, 1), "server_cpu_s": server_cpu_ms / 1000,
     "server_cpu_s_per_gib": round(server_cpu_ms / 1000 / (sum(volumes) / 2**30), 3) if volumes and sum(volumes) else None}
print(json.dumps(j, sort_keys=True))
print(f"fair: {len(done)}/{active} sessions completed; goodput per session min/median/max {j['goodput_mbps_min']}/"
      f"{j['goodput_mbps_median']}/{j['goodput_mbps_max']} Mbit/s, Jain {j['jain_goodput']}; bytes min/median/max "
      f"{j['bytes_min']}/{j['bytes_median']}/{j['bytes_max']}, Jain {j['jain_bytes']}; total {j['total_mbps']} Mbit/s; server CPU "
      f"{j['server_cpu_s']} s = {j['server_cpu_s_per_gib']} s per GiB received", file=sys.stderr)
EOF
}

churn_case() {
    local port server server_timeout_pid="" r cp rc failed=0 rss=() t0 t1
    port=$(nbs_port)
    start_server server "$port" churn-server
    served() { (($(grep -c '"completed"' "$NBS_TMP/churn-server.out" || true) >= r * churn)); }
    t0=$(date +%s.%N)
    for ((r = 1; r <= rounds; r++)); do
        start cp "churn-client-$r" "$NBS_BIN" connect --name client.scale.test "localhost:$port" --sessions "$churn" --bytes 1K \
            --open-concurrency "$concurrency" --max-subflows 2 --local 127.0.0.2 --local 127.0.0.3 --json --no-control \
            --transport "$transport"
        nbs_wait_rc rc "$cp"
        ((rc == 0)) || failed=$((failed + 1))
        wait_for 60 served || true
        rss+=("$(rss_kib "$server")")
        nbs_log "churn: round $r: server RSS ${rss[-1]} KiB"
    done
    t1=$(date +%s.%N)
    local completed
    completed=$(grep -c '"completed":true' "$NBS_TMP/churn-server.out" || true)
    nbs__kill_child "$server_timeout_pid"
    python3 - "$churn" "$rounds" "$completed" "$failed" "$transport" "$t0" "$t1" "${rss[@]}" <<'EOF'
import json, sys
churn, rounds, completed, failed, transport, t0, t1 = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], float(sys.argv[6]), float(sys.argv[7])
rss = [int(x) for x in sys.argv[8:]]
# From the second round: the first also pays for what a server makes once (loops, buffers, the first tasks).
kept = (rss[-1] - rss[1]) / (churn * (rounds - 2)) if rounds > 2 else 0.0
j = {"case": "churn", "transport": transport, "rounds": rounds, "sessions_per_round": churn, "server_completed": completed,
     "client_rounds_failed": failed, "seconds": round(t1 - t0, 1), "server_rss_kib_by_round": rss,
     "kept_kib_per_session_served": round(kept, 3)}
print(json.dumps(j, sort_keys=True))
print(f"churn: {completed} of {churn * rounds} sessions served in {rounds} rounds ({j['seconds']} s); server RSS {rss[0]} -> {rss[-1]} KiB; "
      f"kept {kept:.3f} KiB per session served (rounds 2 to {rounds})", file=sys.stderr)
EOF
}

case $which_case in
    idle) idle_case ;;
    fair) fair_case ;;
    churn) churn_case ;;
    all) idle_case; fair_case; churn_case ;;
esac


#!/usr/bin/env bash
# The benchmark harness (issue 7): NBS, kernel MPTCP and plain TCP side by side, in one run, on the same
# namespace topologies, each figure next to its reference. Not part of the test suite's pass/fail: it exits
# non-zero only when a benchmark could not run (a crash, a lost transfer), never for a missed target.
#
#   netns-scripts/bench.sh [--cases aggregation,failover,loopback,setup,plot] [--quick] [--rates 10+10,10+5,20+5]
#                          [--repeat N] [--out DIR] [--plot FILE] [--setup-delay MS]
#   netns-scripts/bench.sh --summarize DIR      the JSON lines and table again from an earlier run's DIR, running nothing
#
# Cases (each calls the script or binary that owns it; see their headers for the details):
#   aggregation  bench-aggregation.sh once per --rates entry and round: 16 MiB over two tbf paths (A+B Mbit/s),
#                plain TCP on path 1 alone, kernel MPTCP (2 subflows), NBS (aggregate: 4 subflows, IPv4 and
#                IPv6 on each path) and NBS with --max-subflows 2 (nbs-2sf: one per path, as MPTCP has; it
#                shows what the second subflow per path costs). Target: NBS >= MPTCP and >= 90 % of A+B.
#   failover     bench-failover.sh: receive stall after a fault on the client's path 1 (none, link-down,
#                addr-delete, blackhole, hard-move, flapping), MPTCP and NBS alternating, fresh topology each.
#                Targets (issues 3 and 7): link-down < 100 ms and at most a tenth of MPTCP's; blackhole
#                < 500 ms; hard move survived, < 1000 ms.
#   loopback     nbs-bench on loopback: one NBS subflow against plain TCP (SwiftNIO both), goodput and CPU
#                s/GiB, median of alternating rounds, with the application's tasks on Swift's pool (nbs)
#                and on the session's event loop (nbs-loop), as TCP's handlers run. Target: NBS >= 50 % of TCP.
#   setup        open to the first byte from the server against TCP connect, on loopback (from the same
#                nbs-bench run as `loopback`, or its own when `loopback` is not selected) and across the
#                namespace topology (one 10 Mbit/s path: the client opens from 192.0.2.1 only; the name
#                is resolved from the namespace's hosts file). NBS's extra time, after taking the name's
#                resolution off, in TCP round trips (1-byte echo over an open connection). Target: <= 1.
#                The namespace path is measured as it is (RTT ~0.06 ms: the extra time is CPU) and again
#                over a link that delays each direction by --setup-delay ms (default 10, a 20 ms RTT: the
#                extra time is round trips; tools/delay-link.py, as the kernel has no netem), case
#                "netns-rtt20" (the RTT in the name), and again with an opener that proves an identity key
#                (case "netns-rtt20-identity": not admitted at OPEN, docs/PROTOCOL.md). 0 skips both.
#                The namespaces allow TCP Fast Open (lib.sh; NBS_FASTOPEN=1: clients only, as Linux's
#                default), so after the first open (reported alone) OPEN travels in the SYN.
#   plot         bench-failover.sh --cases link-return --timeline: path 1 down ~2 s into a 14 MiB
#                transfer and up 3 s later; receive goodput per 100 ms of NBS and MPTCP on one PNG
#                (gnuplot), --plot FILE (default OUT/bench-failover.png). Its stalls join the failover rows.
# --quick: a short run (rates 10+10,20+5 with 4 MiB, failover link-down and blackhole only, 1 round,
# 512 MiB on loopback, 50 opens).
#
# Output: every sub-run's log and raw JSON in OUT (default: a new /tmp/nbs-bench.XXXXXX, kept), then one
# JSON line per (bench, case, impl) on stdout, then a table. The JSON schema:
#   bench        aggregation | failover | loopback | setup
#   case         aggregation: the rate "A+B"; failover: the fault; loopback: "1-subflow"; setup: "loopback"
#                or "netns"
#   impl         tcp | mptcp | nbs | nbs-2sf (aggregation only) | nbs-loop (loopback only: the application's
#                tasks on the session's event loop, Session.taskExecutor)
#   metric, unit what value measures: goodput (Mbit/s or Gbit/s), stall_after_fault (ms), open_to_first_byte
#                or connect (ms)
#   value        the median over rounds (aggregation, loopback) or the worst trial (failover); null when
#                no trial of it survived
#   values       every round's or trial's figure
#   ref, ratio   the reference implementation in the same bench and case and value / its value (nbs and
#                nbs-2sf: mptcp for aggregation and failover, tcp otherwise; mptcp: tcp for aggregation)
#   target, met  the target as text and whether this value meets it (null when there is none)
#   ok           every round or trial of it completed with its bytes intact (failover: survived)
# plus, per bench: percent_of_sum and rate_sum_mbps (aggregation), survived "k/n" (failover),
# gap_bound_ms and ratio_bound (failover: the longest gap after the fault can be, and that over MPTCP's; a
# receiver lists gaps of 20 ms or more only, so a value of 0 means under 20 ms and under the transfer's
# longest gap; targets are judged by the bound), cpu_s_per_gib (loopback), resolve_ms, tcp_rtt_ms, extra_ms,
# extra_rtts, computation_ms and computation_rtts (setup, nbs: the last two the handshake's cryptography
# that must run between OPEN and the opener's trust in the verdict, in ms and in this path's round trips).
#
# Env: NBS_BIN (default .build/release/nbs-mobility), NBS_BENCH_BIN (default .build/release/nbs-bench),
# both relative to the repository root; build them with
#   swift build -c release --product nbs-mobility && swift build -c release --product nbs-bench
set -euo pipefail
NBS_BIN=${NBS_BIN:-.build/release/nbs-mobility}
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/lib.sh"
NBS_BENCH_BIN=${NBS_BENCH_BIN:-.build/release/nbs-bench}
[[ $NBS_BENCH_BIN == /* ]] || NBS_BENCH_BIN=$NBS_REPO_ROOT/$NBS_BENCH_BIN

cases=aggregation,failover,loopback,setup,plot
rates=10+10,10+5,20+5
repeat=2
quick=0
out=""
plot=""
setup_delay=10
while (($#)); do
    case $1 in
        --cases) cases=$2; shift 2 ;;
        --rates) rates=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        --out) out=$2; shift 2 ;;
        --plot) plot=$2; shift 2 ;;
        --setup-delay) setup_delay=$2; shift 2 ;;
        --summarize) cases="" out=$2; [[ -d $out ]] || nbs_die "--summarize: no directory $out"; shift 2 ;;
        -h | --help) sed -n '2,58p' "$0"; exit 0 ;;
        *) nbs_die "unknown argument $1" ;;
    esac
done
if ! [[ $repeat =~ ^[0-9]+$ ]] || ((repeat < 1 || repeat > 20)); then nbs_die "--repeat takes 1..20"; fi
[[ $setup_delay =~ ^[0-9]+$ ]] && ((setup_delay <= 500)) || nbs_die "--setup-delay takes 0..500 (ms each way)"
for c in ${cases//,/ }; do
    [[ $c =~ ^(aggregation|failover|loopback|setup|plot)$ ]] || nbs_die "unknown case $c"
done
agg_bytes=$((16 * 1024 * 1024))
failover_cases=none,link-down,addr-delete,blackhole,hard-move,flapping
loop_bytes=$((4 * 1024 * 1024 * 1024)) loop_rounds=5 opens=200 delayed_opens=50
if ((quick)); then
    rates=10+10,20+5 agg_bytes=$((4 * 1024 * 1024)) failover_cases=link-down,blackhole repeat=1
    loop_bytes=$((512 * 1024 * 1024)) loop_rounds=1 opens=50 delayed_opens=20
fi
for r in ${rates//,/ }; do nbs_path_rate "$r" 1 >/dev/null; done

nbs_require_netns
nbs_cleanup_on_exit
if [[ -z $out ]]; then out=$(mktemp -d "${TMPDIR:-/tmp}/nbs-bench.XXXXXX"); fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
plot=${plot:-$out/bench-failover.png}
nbs_log "results in $out"
selected() { [[ ,$cases, == *,$1,* ]]; }
FAILED=()

# run_logged NAME BOUND_S CMD...: CMD's stdout to OUT/NAME.out, stderr to OUT/NAME.log, bounded by BOUND_S
# (a shell function instead bounds each of its processes itself); a failure is recorded and the run goes on
# with the next benchmark.
run_logged() {
    local name=$1 bound=$2 rc=0
    shift 2
    nbs_log "$name: $*"
    if declare -F "$1" >/dev/null; then
        # Not in a `||` list, where bash would switch set -e off inside the function.
        set +e
        "$@" >"$out/$name.out" 2>"$out/$name.log"
        rc=$?
        set -e
    else
        timeout -k 10 "$bound" "$@" >"$out/$name.out" 2>"$out/$name.log" || rc=$?
    fi
    if ((rc != 0)); then
        FAILED+=("$name (exit $rc)")
        nbs_log "$name: exit $rc (see $out/$name.log)"
        tail -n 5 "$out/$name.log" >&2 || true
    fi
}

need_bin() {
    [[ -x $1 ]] && return 0
    FAILED+=("$2 (no binary $1: swift build -c release --product ${1##*/})")
    nbs_log "$2: skipped, $1 not found"
    return 1
}

if selected aggregation && need_bin "$NBS_BIN" aggregation; then
    for ((n = 1; n <= repeat; n++)); do
        for r in ${rates//,/ }; do
            run_logged "aggregation-$r-$n" 900 "$NBS_LIB_DIR/bench-aggregation.sh" --rate "$r" --bytes "$agg_bytes" \
                --cases tcp,mptcp,nbs,nbs-2sf
        done
    done
fi

if selected failover && need_bin "$NBS_BIN" failover; then
    run_logged failover 7200 "$NBS_LIB_DIR/bench-failover.sh" --cases "$failover_cases" --repeat "$repeat"
fi

if selected plot && need_bin "$NBS_BIN" plot; then
    run_logged plot 600 "$NBS_LIB_DIR/bench-failover.sh" --cases link-return --timeline "$out/timeline"
fi

if selected loopback && need_bin "$NBS_BENCH_BIN" loopback; then
    run_logged loopback 1800 "$NBS_BENCH_BIN" --bytes "$loop_bytes" --rounds "$loop_rounds" --opens "$opens"
elif selected setup && need_bin "$NBS_BENCH_BIN" setup; then
    run_logged loopback 600 "$NBS_BENCH_BIN" --rounds 0 --opens "$opens"
fi

# Set-up across one namespace path: nbs-bench serves NBS on PORT and a TCP echo on PORT+1 in the server's
# namespace, and measures from the client's.
# setup_once LOG SERVER_NAME SERVER_ADDR CLIENT_ADDR OPENS [CONNECT ARGS...]: one such measurement.
setup_once() {
    local log=$1 name=$2 server=$3 client=$4 n=$5 port spid crc=0 src=0
    shift 5
    port=$(nbs_port)
    nbs_bg spid "$NBS_NS_S" 300 "$out/$log.server" "$out/$log.server.log" "$NBS_BENCH_BIN" --serve-opens "$port" --name "$name" --opens "$n"
    nbs_wait_listen "$NBS_NS_S" $((port + 1))
    nbs_wait_listen "$NBS_NS_S" "$port"
    nbs_c timeout -k 5 300 "$NBS_BENCH_BIN" --connect-opens "$server" --port "$port" --name "$name" --local "$client" --opens "$n" "$@" || crc=$?
    nbs_wait_rc src "$spid"
    ((crc == 0 && src == 0)) || nbs_die "set-up ($log): client exit $crc, server exit $src"
}
setup_netns() (
    set -e
    NBS_CLEANUP=()
    nbs_cleanup_on_exit
    nbs_topology_create --rate 10
    setup_once setup-netns "$NBS_SERVER_NAME" "${NBS_S4[1]}" "${NBS_C4[1]}" "$opens"
    ((setup_delay > 0)) || return 0
    # A third link with a real round trip: this kernel has no netem, so tools/delay-link.py carries its
    # packets between two TUN devices after --setup-delay ms each way. The server's name on it is its own,
    # so that resolving it gives only that link's address.
    local dpid name=rtt.nbs.test c=203.0.113.161 s=203.0.113.162 i where="netns-rtt$((2 * setup_delay))"
    nbs_bg dpid "$NBS_NS_C" 900 "$out/delay-link.out" "$out/delay-link.log" \
        python3 "$NBS_LIB_DIR/tools/delay-link.py" --ns "$NBS_NS_C" "$c" --ns "$NBS_NS_S" "$s" --delay-ms "$setup_delay" --seconds 890
    for ((i = 0; i < 50; i++)); do grep -q ready "$out/delay-link.out" 2>/dev/null && break; sleep 0.1; done
    grep -q ready "$out/delay-link.out" || nbs_die "the delayed link did not come up: $(cat "$out/delay-link.log")"
    printf '%s\t%s\n' "$s" "$name" >>"/etc/netns/$NBS_NS_C/hosts"
    setup_once setup-netns-rtt "$name" "$s" "$c" "$delayed_opens" --where "$where"
    # An opener with an identity key: its proof comes after ACCEPT, so it is not admitted at OPEN.
    setup_once setup-netns-rtt-id "$name" "$s" "$c" "$delayed_opens" --where "$where-identity" --prove-identity
)
if selected setup && need_bin "$NBS_BENCH_BIN" setup; then
    run_logged setup-netns 900 setup_netns
fi

if selected plot && [[ -s $out/plot.out ]]; then
    if command -v gnuplot >/dev/null; then
        run_logged plot-png 60 python3 - "$out/plot.out" "$plot" <<'EOF'
import json, subprocess, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
series = [r for r in rows if r.get("timeline")]
if not series:
    sys.exit("no timeline in " + sys.argv[1])
fault = series[0].get("fault_at_s") or 2.0
label = {"nbs": "NBS (aggregate)", "mptcp": "kernel MPTCP"}
plots = ", ".join(
    "'%s' using ($1/1000):($2*8/0.1/1e6) with steps lw 2 title '%s, longest gap after the fault %s ms'"
    % (r["timeline"], label.get(r["impl"], r["impl"]),
       "%.0f" % r["stall_after_fault_ms"] if r.get("stall_after_fault_ms") is not None else "n/a")
    for r in series)
script = """
set terminal pngcairo size 1000,520 font 'sans,10'
set output '%s'
set title 'Receive goodput per 100 ms: 2 x %s Mbit/s paths, path 1 down at %.1f s, up at %.1f s'
set xlabel 'seconds since the receiver accepted (fault lines: seconds since the client started, a few ms up to 0.1 s earlier)'
set ylabel 'Mbit/s'
set yrange [0:*]
set grid
set key top right
set arrow from %.2f, graph 0 to %.2f, graph 1 nohead dt 2 lc rgb 'red'
set arrow from %.2f, graph 0 to %.2f, graph 1 nohead dt 2 lc rgb 'dark-green'
plot %s
""" % (sys.argv[2], series[0].get("rate_mbit_per_path"), fault, fault + 3, fault, fault, fault + 3, fault + 3, plots)
subprocess.run(["gnuplot"], input=script.encode(), check=True)
print(sys.argv[2])
EOF
    else
        FAILED+=("plot (gnuplot not found: netns-scripts/install.sh installs gnuplot-nox)")
    fi
fi

python3 - "$out" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]

def lines(path):
    try:
        return [json.loads(l) for l in open(path, encoding="utf-8", errors="replace") if l.startswith("{")]
    except (OSError, ValueError):
        return []

def median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None

rows = []
def row(bench, case, impl, metric, unit, values, ok, **extra):
    r = {"bench": bench, "case": case, "impl": impl, "metric": metric, "unit": unit, "value": None, "values": values,
         "ref": None, "ratio": None, "target": None, "met": None, "ok": ok}
    r.update(extra)
    rows.append(r)
    return r

def link(r, ref_impl, lower_is_better=False):
    ref = next((x for x in rows if x["bench"] == r["bench"] and x["case"] == r["case"] and x["impl"] == ref_impl), None)
    if ref is None:
        return None
    r["ref"] = ref_impl
    if r["value"] is not None and ref["value"]:
        r["ratio"] = round(r["value"] / ref["value"], 3)
    return ref

# aggregation: one row per (rate, impl), the median over rounds.
agg = [j for f in sorted(glob.glob(os.path.join(out, "aggregation-*.out"))) for j in lines(f)]
for rate in dict.fromkeys(j["rate"] for j in agg):
    for impl in ("tcp", "mptcp", "nbs", "nbs-2sf"):
        rs = [j for j in agg if j["rate"] == rate and j["case"] == impl]
        if not rs:
            continue
        r = row("aggregation", rate, impl, "goodput", "Mbit/s", [j["goodput_mbps"] for j in rs], all(j["ok"] for j in rs),
                rate_sum_mbps=rs[0]["rate_sum_mbps"])
        r["value"] = median(r["values"])
        r["percent_of_sum"] = round(100 * r["value"] / r["rate_sum_mbps"], 1) if r["value"] is not None else None
for r in [r for r in rows if r["bench"] == "aggregation"]:
    if r["impl"] == "mptcp":
        link(r, "tcp")
    elif r["impl"] == "nbs-2sf":
        link(r, "mptcp")
    elif r["impl"] == "nbs":
        ref = link(r, "mptcp")
        r["target"] = ">= MPTCP and >= 90 % of the sum"
        if r["value"] is not None and ref is not None and ref["value"] is not None:
            r["met"] = r["value"] >= ref["value"] and r["percent_of_sum"] >= 90

# failover (and the plot's link-return trials): one row per (fault, impl), the worst surviving trial.
# A receiver lists only gaps of STALL_LIST_MS or more, so a trial's 0 after the fault says every gap after it
# was shorter than that, and no longer than the whole transfer's longest (max_stall_ms): that bound, not 0,
# is what a ratio to MPTCP may claim.
STALL_LIST_MS = 20.0
def gap_bound(j):
    if j["stall_after_fault_ms"]:
        return j["stall_after_fault_ms"]
    return STALL_LIST_MS if j.get("max_stall_ms") is None else min(STALL_LIST_MS, j["max_stall_ms"])
TARGETS = {"link-down": ("< 100 ms and <= 0.1 x MPTCP", lambda v, ratio: v < 100 and ratio is not None and ratio <= 0.1),
           "blackhole": ("< 500 ms", lambda v, ratio: v < 500),
           "hard-move": ("survives, < 1000 ms", lambda v, ratio: v < 1000)}
fo = lines(os.path.join(out, "failover.out")) + lines(os.path.join(out, "plot.out"))
for case in dict.fromkeys(j["case"] for j in fo):
    for impl in ("mptcp", "nbs"):
        ts = [j for j in fo if j["case"] == case and j["impl"] == impl]
        if not ts:
            continue
        alive = [j for j in ts if j["survived"]]
        r = row("failover", case, impl, "stall_after_fault", "ms", [j["stall_after_fault_ms"] if j["survived"] else None for j in ts],
                len(alive) == len(ts), survived="%d/%d" % (len(alive), len(ts)),
                max_stall_ms=[j["max_stall_ms"] for j in ts])
        stalls = [j["stall_after_fault_ms"] for j in alive if j["stall_after_fault_ms"] is not None]
        r["value"] = max(stalls) if stalls else None
        if stalls:
            r["gap_bound_ms"] = round(max(gap_bound(j) for j in alive if j["stall_after_fault_ms"] is not None), 1)
for r in [r for r in rows if r["bench"] == "failover" and r["impl"] == "nbs"]:
    ref = link(r, "mptcp")
    if r.get("gap_bound_ms") is not None and ref is not None and ref["value"]:
        r["ratio_bound"] = round(r["gap_bound_ms"] / ref["value"], 3)
    if r["case"] in TARGETS:
        r["target"], test = TARGETS[r["case"]]
        r["met"] = r["ok"] and r["value"] is not None and test(r["gap_bound_ms"], r.get("ratio_bound"))

# loopback and set-up: nbs-bench's JSON lines.
names = {"plain TCP (SwiftNIO)": "tcp", "NBS, 1 subflow": "nbs", "NBS, on the session's loop": "nbs-loop"}
loop = lines(os.path.join(out, "loopback.out"))
for j in loop:
    if j.get("case") in names:
        r = row("loopback", "1-subflow", names[j["case"]], "goodput", "Gbit/s", [round(x, 2) for x in j["all_rounds_gbps"]], True,
                cpu_s_per_gib=round(j["cpu_s_per_gib"], 3), bytes=j["bytes"])
        r["value"] = round(j["goodput_gbps"], 2)
for r in [r for r in rows if r["bench"] == "loopback" and r["impl"] in ("nbs", "nbs-loop")]:
    link(r, "tcp")
    r["target"] = ">= 0.5 x TCP"
    r["met"] = r["ratio"] is not None and r["ratio"] >= 0.5
for j in loop + lines(os.path.join(out, "setup-netns.out")):
    if j.get("case") != "setup_latency":
        continue
    t = row("setup", j["where"], "tcp", "connect", "ms", None, True, samples=j["samples"])
    t["value"] = round(j["tcp_connect_ms_median"], 3)
    n = row("setup", j["where"], "nbs", "open_to_first_byte", "ms", None, True, samples=j["samples"],
            resolve_ms=round(j["resolve_ms_median"], 3), tcp_rtt_ms=round(j["tcp_rtt_ms_median"], 3),
            extra_ms=round(j["nbs_extra_ms"], 3), extra_rtts=round(j["nbs_extra_rtts"], 2), first_open_ms=round(j.get("nbs_first_open_ms", 0), 3))
    if "handshake_computation_ms_median" in j:
        n["computation_ms"] = round(j["handshake_computation_ms_median"], 3)
        n["computation_rtts"] = round(j["handshake_computation_rtts"], 2)
    n["value"] = round(j["nbs_open_first_byte_ms_median"], 3)
    link(n, "tcp")
    n["target"] = "<= TCP connect + name resolution + 1 RTT"
    n["met"] = j["nbs_extra_rtts"] <= 1

for r in rows:
    print(json.dumps(r))
print()
print("%-12s %-12s %-8s %-24s %9s %7s %-40s %s" % ("bench", "case", "impl", "metric", "value", "ratio", "target", "met / notes"))
for r in rows:
    v = "-" if r["value"] is None else ("%.3f" % r["value"] if r["unit"] == "ms" and r["bench"] == "setup" else "%.2f" % r["value"])
    notes = []
    if r["met"] is not None:
        notes.append("yes" if r["met"] else "NO")
    if "percent_of_sum" in r:
        notes.append("%s %% of %s" % (r["percent_of_sum"], r["rate_sum_mbps"]))
    if "survived" in r:
        notes.append("survived %s" % r["survived"])
    if r.get("value") == 0 and r.get("gap_bound_ms") is not None:
        notes.append("every gap after the fault <= %.0f ms%s" % (r["gap_bound_ms"], ", ratio <= %.2f" % r["ratio_bound"] if r.get("ratio_bound") is not None else ""))
    if "cpu_s_per_gib" in r:
        notes.append("CPU %.3f s/GiB" % r["cpu_s_per_gib"])
    if "extra_rtts" in r:
        notes.append("resolve %.3f ms, RTT %.3f ms, extra %.3f ms = %.2f RTT; first open %.3f ms" % (r["resolve_ms"], r["tcp_rtt_ms"], r["extra_ms"], r["extra_rtts"], r["first_open_ms"]))
    if "computation_ms" in r:
        notes.append("handshake computation %.3f ms = %.2f RTT" % (r["computation_ms"], r["computation_rtts"]))
    if not r["ok"]:
        notes.append("NOT ALL OK")
    print("%-12s %-12s %-8s %-24s %9s %7s %-40s %s" % (r["bench"], r["case"], r["impl"], "%s (%s)" % (r["metric"], r["unit"]), v,
                                                    "-" if r["ratio"] is None else "%.2f" % r["ratio"], r["target"] or "", ", ".join(notes)))
EOF
if selected plot && [[ -s $plot ]]; then echo "plot: $plot"; fi
echo "logs and raw JSON: $out"
if ((${#FAILED[@]})); then
    printf 'did not complete: %s\n' "${FAILED[@]}"
    exit 1
fi

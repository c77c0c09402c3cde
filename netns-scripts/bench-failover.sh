#!/usr/bin/env bash
# Failover benchmark: kernel MPTCP and NBS side by side, in one run, on the same topology (two paths, tbf on both
# ends), each trial on a fresh copy of it. A bulk transfer client -> server; ~2 s in, a fault on the client's
# path 1; the figures are the receiver's longest gap between deliveries that ended after the fault
# (stall_after_fault_ms, from its `stalls` list) and over the whole transfer (max_stall_ms).
#   none         no fault: the stall that reordering across subflows alone causes (the baseline)
#   link-down    ip link set nbs1 down                         (DESIGN reference, MPTCP: stalls 0.7-1.2 s)
#   addr-delete  192.0.2.1 and 2001:db8:1::1 deleted, link up  (MPTCP: 0.36-1.15 s)
#   blackhole    nft drops everything on nbs1, no link event   (MPTCP: 1.1-1.2 s)
#   hard-move    client has path 1 only; its addresses deleted, 0.5 s later new ones on nbs2
#                (MPTCP with mptcpd: did not survive). MPTCP gets the new address as a `subflow` endpoint
#                right after it appears, which is what mptcpd would do (--mptcp-no-pm: it gets nothing).
#   flapping     nbs1 down/up every 0.5 s, 6 times
#   link-return  nbs1 down, back up 3 s later (not in the default set; bench.sh plots it)
# MPTCP: tools/mptcp_xfer.py (IPPROTO_MPTCP), `ip mptcp limits set subflow 2 add_addr_accepted 2` on both hosts,
# the client's 198.51.100.1 a `subflow` endpoint (bound to nbs2; unbound with --srcroute), IPv4 only. NBS:
# nbs-mobility serve --sink --once / connect --policy aggregate (IPv4 and IPv6 subflows). A transfer that delivers
# nothing for --give-up seconds "did not survive".
# Prints one JSON line per trial on stdout, then a table (per case: each implementation's stalls, and how many
# trials survived). Exit 0 when every NBS trial survived with its bytes intact (MPTCP results are reported only).
# fault_at_s is in the receiver's clock (from its accept: both receivers report that moment's wall-clock time),
# and a gap counts as after the fault if it ended after it (10 ms of slack).
# --timeline DIR: each receiver also writes its bytes per 100 ms to DIR/CASE-IMPL-TRIAL.tl ("t_ms bytes" lines,
# from its accept, the origin of fault_at_s), named in the JSON line.
#
#   netns-scripts/bench-failover.sh [--cases none,link-down,addr-delete,blackhole,hard-move,flapping,link-return]
#                                   [--impls mptcp,nbs,nbs-udp] [--repeat N] [--rate MBIT] [--delay S] [--give-up S]
#                                   [--srcroute] [--mptcp-no-pm] [--timeline DIR] [--nbs-arg ARG ...]
# --nbs-arg ARG (repeatable) is added to NBS's connect, e.g. --nbs-arg --max-subflows --nbs-arg 2.
# Env: NBS_BIN (default .build/debug/nbs-mobility), NBS_BENCH_TIMEOUT (s per process, default 90).
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/lib.sh"

cases=none,link-down,addr-delete,blackhole,hard-move,flapping
mptcp_pm=1
impls=mptcp,nbs
repeat=1
rate=10
delay=2
give_up=15
srcroute=0
timeline=""
nbs_args=()
while (($#)); do
    case $1 in
        --cases) cases=$2; shift 2 ;;
        --impls) impls=$2; shift 2 ;;
        --repeat) repeat=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --delay) delay=$2; shift 2 ;;
        --give-up) give_up=$2; shift 2 ;;
        --srcroute) srcroute=1; shift ;;
        --mptcp-no-pm) mptcp_pm=0; shift ;;
        --timeline) timeline=$(mkdir -p "$2" && cd "$2" && pwd); shift 2 ;;
        --nbs-arg) nbs_args+=("$2"); shift 2 ;;
        -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
        *) nbs_die "unknown argument $1" ;;
    esac
done
if ! [[ $repeat =~ ^[0-9]+$ ]] || ((repeat < 1 || repeat > 20)); then nbs_die "--repeat takes 1..20"; fi
tmo=${NBS_BENCH_TIMEOUT:-90}
xfer=$NBS_LIB_DIR/tools/mptcp_xfer.py

nbs_require_netns
nbs_cleanup_on_exit
nbs_tmpdir

# Bytes per case: ~7-9 s at 2 x 10 Mbit/s with one path lost at 2 s; 8 MiB for the single-path hard move;
# 14 MiB for link-return, so that about 2 s of the transfer follow the path's return.
case_bytes() {
    local mib=10
    [[ $1 == hard-move ]] && mib=8
    [[ $1 == link-return ]] && mib=14
    echo $((mib * 1024 * 1024 * rate / 10))
}

# The fault of CASE for IMPL (eval'd by run_trial).
case_fault() {
    case $1 in
        none) echo ":" ;;
        link-down) echo "nbs_link_down 1 c" ;;
        addr-delete) echo "nbs_addr_del 1 all c" ;;
        blackhole) echo "nbs_blackhole 1 c" ;;
        hard-move)
            if [[ $2 == mptcp ]] && ((mptcp_pm)); then
                echo "nbs_move c 0.5; ip -n \"\$NBS_NS_C\" mptcp endpoint add $NBS_C4_MOVED dev nbs2 subflow"
            else
                echo "nbs_move c 0.5"
            fi
            ;;
        flapping) echo "nbs_flap 1 6 0.5 c" ;;
        link-return) echo "nbs_link_down 1 c; sleep 3; nbs_link_up 1 c" ;;
        *) nbs_die "unknown case $1" ;;
    esac
}

# run_trial CASE IMPL N: in a subshell with its own topology and cleanup; appends one JSON line to $NBS_TMP/rows.
run_trial() (
    local name=$1 impl=$2 n=$3 bytes fault port sp cp crc=0 src=0 fault_at="" fault_ns="" t0 prefix
    NBS_CLEANUP=()
    nbs_cleanup_on_exit
    bytes=$(case_bytes "$name")
    fault=$(case_fault "$name" "$impl")
    prefix=$NBS_TMP/$name-$impl-$n
    local -a topo=(--rate "$rate")
    [[ $name == hard-move ]] && topo+=(--move c)
    ((srcroute)) && topo+=(--srcroute)
    nbs_topology_create "${topo[@]}" 2>>"$prefix.log"
    port=$(nbs_port)
    local -a scmd ccmd
    local transport=tcp
    if [[ $impl == mptcp ]]; then
        local ns
        for ns in "$NBS_NS_C" "$NBS_NS_S"; do ip -n "$ns" mptcp limits set subflow 2 add_addr_accepted 2; done
        if [[ $name != hard-move ]]; then
            if ((srcroute)); then
                ip -n "$NBS_NS_C" mptcp endpoint add "${NBS_C4[2]}" subflow
            else
                ip -n "$NBS_NS_C" mptcp endpoint add "${NBS_C4[2]}" dev "$NBS_IF_2" subflow
            fi
        fi
        scmd=(python3 "$xfer" server --port "$port" --proto mptcp --timeout "$tmo" --recv-timeout "$give_up")
        ccmd=(python3 "$xfer" client --connect "${NBS_S4[1]}" --port "$port" --proto mptcp --bytes "$bytes"
            --timeout "$tmo" --stall-timeout "$give_up")
    else
        transport=tcp
        [[ $impl == nbs-udp ]] && transport=udp
        scmd=("$NBS_BIN" serve --name "$NBS_SERVER_NAME" --port "$port" --sink --once --json --transport "$transport")
        ccmd=("$NBS_BIN" connect --name "$NBS_CLIENT_NAME" "$NBS_SERVER_NAME:$port" --bytes "$bytes"
            --policy aggregate --json --transport "$transport" "${nbs_args[@]}")
    fi
    local tl=""
    if [[ -n $timeline ]]; then
        tl=$timeline/$name-$impl-$n.tl
        scmd+=(--timeline "$tl")
    fi
    nbs_log "$name/$impl #$n: ${bytes} B, fault after ${delay}s: $fault"
    nbs_bg sp "$NBS_NS_S" "$tmo" "$prefix.server" "$prefix.server.err" "${scmd[@]}"
    nbs_wait_listen "$NBS_NS_S" "$port" 10 "${transport:-tcp}"
    t0=$(date +%s%N)
    nbs_bg cp "$NBS_NS_C" "$tmo" "$prefix.client" "$prefix.client.err" "${ccmd[@]}"
    sleep "$delay"
    if nbs__pid_alive "$cp"; then
        fault_ns=$(date +%s%N)
        fault_at=$(awk -v n="$fault_ns" -v t="$t0" 'BEGIN { printf "%.2f", (n - t) / 1e9 }')
        eval "$fault" 2>>"$prefix.log" || nbs_log "$name/$impl #$n: the fault command failed"
    fi
    nbs_wait_rc crc "$cp"
    nbs_wait_rc src "$sp"
    python3 - "$name" "$impl" "$n" "$prefix" "$crc" "$src" "$bytes" "$fault_at" "$srcroute" "$rate" "$tl" "$fault_ns" \
        >>"$NBS_TMP/rows" <<'EOF'
import json, sys
name, impl, n, prefix, crc, src, size, fault_at, srcroute, rate, timeline, fault_ns = sys.argv[1:]

def last(path):
    try:
        lines = [l for l in open(path, encoding="utf-8", errors="replace").read().splitlines() if l.strip()]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}

c, s = last(prefix + ".client"), last(prefix + ".server")
# The longest gap that ended after the fault. The receiver's times count from its accept, a little after the
# client's start (fault_at is measured from that). A receiver that reports the wall-clock time of its origin
# (started_unix) gets the fault in its own clock, to 10 ms; one that does not gets 0.3 s of slack, which also
# counts a gap from the transfer's own loss recovery that ended up to 0.3 s before the fault.
after = None
if fault_at and fault_ns and s.get("started_unix"):
    fault_at = "%.3f" % (int(fault_ns) / 1e9 - float(s["started_unix"]))
    slack = 0.01
else:
    slack = 0.3
if fault_at and isinstance(s.get("stalls"), list):
    ends = [st["ms"] for st in s["stalls"] if st.get("at_s") is not None
            and st["at_s"] + st["ms"] / 1000 >= float(fault_at) - slack]
    after = max(ends) if ends else 0.0
intact = c.get("bytes") == int(size) and s.get("bytes") == int(size) and bool(c.get("sha256")) \
    and c.get("sha256") == s.get("sha256")
survived = crc == "0" and src == "0" and intact and bool(fault_at)
error = s.get("error") or c.get("error")
if not error and not survived:
    error = "exit codes client %s server %s, bytes %s/%s of %s" % (crc, src, c.get("bytes"), s.get("bytes"), size)
if not fault_at:
    error = "ended before the fault"
print(json.dumps({
    "case": name, "impl": impl, "trial": int(n), "survived": survived, "intact": intact,
    "max_stall_ms": s.get("max_stall_ms"), "max_stall_at_s": s.get("max_stall_at_s"),
    "stall_after_fault_ms": after, "bytes": s.get("bytes"), "seconds": s.get("seconds"),
    "goodput_mbps": s.get("goodput_mbps"), "subflows_max": s.get("subflows_max"),
    "fault_at_s": float(fault_at) if fault_at else None, "rate_mbit_per_path": float(rate),
    "srcroute": srcroute == "1", "timeline": timeline or None, "error": None if survived else error,
}))
EOF
    tail -n 1 "$NBS_TMP/rows"
)

: >"$NBS_TMP/rows"
for c in ${cases//,/ }; do
    case_fault "$c" nbs >/dev/null # validates the name
    for ((n = 1; n <= repeat; n++)); do
        for impl in ${impls//,/ }; do
            case $impl in
                mptcp)
                    if [[ $(sysctl -n net.mptcp.enabled 2>/dev/null || echo 0) != 1 ]]; then
                        nbs_log "mptcp: skipped, net.mptcp.enabled is not 1"
                        continue
                    fi
                    ;;
                nbs | nbs-udp)
                    if [[ ! -x $NBS_BIN ]]; then
                        nbs_log "nbs: skipped, NBS binary not found: $NBS_BIN (run 'swift build')"
                        continue
                    fi
                    ;;
                *) nbs_die "unknown implementation $impl" ;;
            esac
            run_trial "$c" "$impl" "$n"
        done
    done
done

python3 - "$NBS_TMP/rows" "$rate" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
if not rows:
    sys.exit(0)
impls = [i for i in ("mptcp", "nbs", "nbs-udp") if any(r["impl"] == i for r in rows)]
cases = []
for r in rows:
    if r["case"] not in cases:
        cases.append(r["case"])

def cell(rs, key):
    if not rs:
        return "-"
    ok = [r for r in rs if r["survived"]]
    if not ok:
        return "did not survive (%d/%d)" % (len(rs), len(rs))
    stalls = sorted(r[key] for r in ok if r.get(key) is not None)
    if not stalls:
        text = "n/a"
    elif len(stalls) == 1:
        text = "%.0f ms" % stalls[0]
    else:
        text = "%.0f-%.0f ms" % (stalls[0], stalls[-1])
    if len(ok) < len(rs):
        text += ", %d/%d died" % (len(rs) - len(ok), len(rs))
    return text

for key, title in (("stall_after_fault_ms", "longest receive gap that ended after the fault"),
                   ("max_stall_ms", "max_stall_ms (longest receive gap of the whole transfer)")):
    print()
    print("%s, %s Mbit/s per path, fault on the client's path 1" % (title, sys.argv[2]))
    print("%-12s" % "case" + "".join("%-30s" % i for i in impls))
    for c in cases:
        print("%-12s" % c + "".join("%-30s" % cell([r for r in rows if r["case"] == c and r["impl"] == i], key)
                                    for i in impls))
for r in rows:
    if not r["survived"]:
        print("  %s/%s #%d: %s" % (r["case"], r["impl"], r["trial"], r.get("error")))
bad = [r for r in rows if r["impl"] == "nbs" and not r["survived"]]
sys.exit(1 if bad else 0)
EOF

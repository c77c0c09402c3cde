# shellcheck shell=bash
# netns-scripts/lib.sh: shared helpers for the NBS namespace topologies.
#
# Source it from a script that runs with `set -euo pipefail`:
#
#   source "$(dirname "$0")/../lib.sh"
#   nbs_cleanup_on_exit              # trap EXIT/INT/TERM -> destroy everything this script made
#   nbs_topology_create --rate 10    # two namespaces, two veth paths, tbf 10 Mbit/s on both ends
#   nbs_c ping -c1 server.nbs.test   # run in the client namespace (nbs_s: server namespace)
#
# Topology (interface names are the same inside both namespaces):
#
#   $NBS_NS_C                                         $NBS_NS_S
#   nbs1 192.0.2.1/24     2001:db8:1::1/64  <---->  nbs1 192.0.2.2/24     2001:db8:1::2/64   path 1
#   nbs2 198.51.100.1/24  2001:db8:2::1/64  <---->  nbs2 198.51.100.2/24  2001:db8:2::2/64   path 2
#
# Both namespaces get /etc/netns/NS/hosts with client.nbs.test and server.nbs.test, each naming all four
# of its addresses (ip netns exec bind-mounts that file over /etc/hosts).
# Each path is its own directly connected subnet, so no policy routing is needed.

NBS_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NBS_REPO_ROOT=$(cd "$NBS_LIB_DIR/.." && pwd)
export NBS_LIB_DIR NBS_REPO_ROOT

# The CLI under test. A relative NBS_BIN is relative to the repository root.
NBS_BIN=${NBS_BIN:-.build/debug/nbs-mobility}
[[ $NBS_BIN == /* ]] || NBS_BIN=$NBS_REPO_ROOT/$NBS_BIN
export NBS_BIN

NBS_CLIENT_NAME=client.nbs.test
NBS_SERVER_NAME=server.nbs.test
NBS_IF_1=nbs1
NBS_IF_2=nbs2
# Addresses per path: index 1 and 2.
NBS_C4=("" 192.0.2.1 198.51.100.1)
NBS_S4=("" 192.0.2.2 198.51.100.2)
NBS_C6=("" 2001:db8:1::1 2001:db8:2::1)
NBS_S6=("" 2001:db8:1::2 2001:db8:2::2)
export NBS_CLIENT_NAME NBS_SERVER_NAME NBS_IF_1 NBS_IF_2

# Exit code a scenario uses to say "skipped" (the automake convention).
NBS_SKIP=77

nbs_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
nbs_die() { nbs_log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------- cleanup
# Commands run on exit, last registered first.
NBS_CLEANUP=()
nbs_on_exit() { NBS_CLEANUP+=("$*"); }

nbs__run_cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    set +e
    for ((i = ${#NBS_CLEANUP[@]} - 1; i >= 0; i--)); do
        eval "${NBS_CLEANUP[i]}" >/dev/null 2>&1
    done
    NBS_CLEANUP=()
    exit "$rc"
}

# Install the traps: every namespace, /etc/netns dir, background process and temp dir this script
# registered is removed on normal exit, on failure (set -e), and on INT/TERM.
nbs_cleanup_on_exit() {
    trap nbs__run_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# A private temp dir, removed on exit unless NBS_KEEP_TMP=1. Sets NBS_TMP.
nbs_tmpdir() {
    NBS_TMP=$(mktemp -d "${TMPDIR:-/tmp}/nbs.XXXXXX")
    if [[ ${NBS_KEEP_TMP:-0} == 1 ]]; then
        nbs_log "keeping temp dir $NBS_TMP"
    else
        nbs_on_exit "rm -rf '$NBS_TMP'"
    fi
}

# ---------------------------------------------------------------------------------------------- checks
# True when we can create namespaces (root, iproute2 with netns support).
nbs_can_netns() {
    [[ $(id -u) == 0 ]] || return 1
    command -v ip >/dev/null || return 1
    local probe="nbs-probe-$$-$RANDOM"
    ip netns add "$probe" 2>/dev/null || return 1
    ip netns del "$probe" 2>/dev/null || true
}

# Exit with the skip code unless namespaces are usable.
nbs_require_netns() {
    nbs_can_netns || { nbs_log "skip: needs root and a working 'ip netns'"; exit "$NBS_SKIP"; }
}

# Exit with the skip code (or fail, when NBS_REQUIRE_BIN=1) unless the NBS binary exists.
nbs_require_bin() {
    [[ -x $NBS_BIN ]] && return 0
    if [[ ${NBS_REQUIRE_BIN:-0} == 1 ]]; then
        nbs_die "NBS binary not found: $NBS_BIN"
    fi
    nbs_log "skip: NBS binary not found: $NBS_BIN (build it with 'swift build')"
    exit "$NBS_SKIP"
}

# ---------------------------------------------------------------------------------------------- topology
nbs_c() { ip netns exec "$NBS_NS_C" "$@"; }
nbs_s() { ip netns exec "$NBS_NS_S" "$@"; }

# nbs_ns_side c|s -> namespace name
nbs_ns_side() {
    case $1 in
        c | client) echo "$NBS_NS_C" ;;
        s | server) echo "$NBS_NS_S" ;;
        *) nbs_die "side must be c or s, not '$1'" ;;
    esac
}

nbs__hosts_file() {
    local i
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
    for i in 1 2; do printf '%s\t%s\n' "${NBS_C4[i]}" "$NBS_CLIENT_NAME"; done
    for i in 1 2; do printf '%s\t%s\n' "${NBS_C6[i]}" "$NBS_CLIENT_NAME"; done
    for i in 1 2; do printf '%s\t%s\n' "${NBS_S4[i]}" "$NBS_SERVER_NAME"; done
    for i in 1 2; do printf '%s\t%s\n' "${NBS_S6[i]}" "$NBS_SERVER_NAME"; done
}

# nbs_tbf NS DEV RATE_MBIT: token bucket on DEV's egress. Burst 15 kB (10 full frames) and 50 ms of queue
# give ~9.5 Mbit/s of TCP goodput at 10 Mbit/s (see bench-aggregation.sh).
nbs_tbf() {
    local ns=$1 dev=$2 rate=$3
    tc -n "$ns" qdisc replace dev "$dev" root tbf rate "${rate}mbit" \
        burst "${NBS_TBF_BURST:-15k}" latency "${NBS_TBF_LATENCY:-50ms}"
}

# nbs_topology_create [--rate MBIT] [--id ID]
# Creates the two-namespace, two-path topology and exports NBS_NS_C, NBS_NS_S. Registers its own cleanup
# (call nbs_cleanup_on_exit first so that the cleanup also runs on failure).
nbs_topology_create() {
    local rate=${NBS_RATE:-0} id="$$-$RANDOM" ns i dev
    while (($#)); do
        case $1 in
            --rate) rate=$2; shift 2 ;;
            --id) id=$2; shift 2 ;;
            *) nbs_die "nbs_topology_create: unknown argument $1" ;;
        esac
    done
    NBS_NS_C="nbs-c-$id"
    NBS_NS_S="nbs-s-$id"
    export NBS_NS_C NBS_NS_S NBS_TOPOLOGY_RATE=$rate
    nbs_on_exit nbs_topology_destroy

    for ns in "$NBS_NS_C" "$NBS_NS_S"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        # No DAD anywhere (link-local addresses included), so nothing is ever tentative.
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
        mkdir -p "/etc/netns/$ns"
        nbs__hosts_file >"/etc/netns/$ns/hosts"
    done
    for i in 1 2; do
        dev=nbs$i
        ip -n "$NBS_NS_C" link add "$dev" type veth peer name "$dev" netns "$NBS_NS_S"
        ip -n "$NBS_NS_C" addr add "${NBS_C4[i]}/24" dev "$dev"
        ip -n "$NBS_NS_S" addr add "${NBS_S4[i]}/24" dev "$dev"
        ip -n "$NBS_NS_C" addr add "${NBS_C6[i]}/64" dev "$dev" nodad
        ip -n "$NBS_NS_S" addr add "${NBS_S6[i]}/64" dev "$dev" nodad
        ip -n "$NBS_NS_C" link set "$dev" up
        ip -n "$NBS_NS_S" link set "$dev" up
        if [[ $rate != 0 ]]; then
            nbs_tbf "$NBS_NS_C" "$dev" "$rate"
            nbs_tbf "$NBS_NS_S" "$dev" "$rate"
        fi
    done
    nbs_log "topology up: client ns $NBS_NS_C, server ns $NBS_NS_S, rate ${rate:-0} Mbit/s per path (0 = unlimited)"
}

# Kill what still runs inside one of our namespaces (by pid), delete it and its /etc/netns dir.
nbs_ns_destroy() {
    local ns=$1 pids
    [[ -n $ns ]] || return 0
    if ip netns list | awk '{print $1}' | grep -qxF "$ns"; then
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        if [[ -n $pids ]]; then
            # shellcheck disable=SC2086
            kill -TERM $pids 2>/dev/null || true
            sleep 0.3
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            # shellcheck disable=SC2086
            [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
        fi
        ip netns del "$ns" 2>/dev/null || true
    fi
    [[ $ns == nbs-* ]] && rm -rf "/etc/netns/$ns"
    return 0
}

nbs_topology_destroy() {
    nbs_ns_destroy "${NBS_NS_C:-}"
    nbs_ns_destroy "${NBS_NS_S:-}"
    rmdir /etc/netns 2>/dev/null || true
}

# True when PID exists and is not a zombie.
nbs__pid_alive() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z ]]
}

# Remove namespaces left behind by runs that were killed with SIGKILL: nbs-[cs]-PID-* whose PID is gone.
nbs_gc_stale() {
    local ns pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^nbs-[cs]-[0-9]+-' || true); do
        pid=${ns#nbs-?-}; pid=${pid%%-*}
        if ! nbs__pid_alive "$pid"; then
            nbs_log "removing stale namespace $ns"
            nbs_ns_destroy "$ns"
        fi
    done
    for ns in /etc/netns/nbs-[cs]-*; do
        [[ -d $ns ]] || continue
        ip netns list | awk '{print $1}' | grep -qxF "${ns##*/}" || rm -rf "$ns"
    done
    rmdir /etc/netns 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------- path events
# nbs_link_down PATHNO [c|s]: take a path's veth down (default: on the client; the peer loses carrier).
# As on any Linux host, the kernel then also deletes that side's IPv6 addresses (keep_addr_on_down=0);
# the IPv4 ones stay.
nbs_link_down() { ip -n "$(nbs_ns_side "${2:-c}")" link set "nbs$1" down; }

# nbs_link_up PATHNO [c|s]: bring it back up, and its IPv6 address with it.
nbs_link_up() {
    local side=${2:-c} ns
    ns=$(nbs_ns_side "$side")
    ip -n "$ns" link set "nbs$1" up
    ip -n "$ns" addr replace "$(nbs_addr "${side:0:1}" 6 "$1")" dev "nbs$1" nodad
}

# nbs_addr SIDE FAMILY PATHNO -> "ADDRESS/PREFIX" of that side (c|s), family (4|6) and path (1|2).
nbs_addr() {
    case $1$2 in
        c4) echo "${NBS_C4[$3]}/24" ;; s4) echo "${NBS_S4[$3]}/24" ;;
        c6) echo "${NBS_C6[$3]}/64" ;; s6) echo "${NBS_S6[$3]}/64" ;;
        *) nbs_die "nbs_addr: bad side/family $1 $2" ;;
    esac
}

# nbs_addr_del PATHNO [4|6|all] [c|s]: delete a path's address(es); the link stays up.
nbs_addr_del() {
    local p=$1 fam=${2:-all} side=${3:-c} ns
    ns=$(nbs_ns_side "$side")
    [[ $fam == 6 ]] || ip -n "$ns" addr del "$(nbs_addr "${side:0:1}" 4 "$p")" dev "nbs$p"
    [[ $fam == 4 ]] || ip -n "$ns" addr del "$(nbs_addr "${side:0:1}" 6 "$p")" dev "nbs$p"
}

# nbs_addr_add PATHNO [4|6|all] [c|s]: put them back.
nbs_addr_add() {
    local p=$1 fam=${2:-all} side=${3:-c} ns
    ns=$(nbs_ns_side "$side")
    [[ $fam == 6 ]] || ip -n "$ns" addr add "$(nbs_addr "${side:0:1}" 4 "$p")" dev "nbs$p"
    [[ $fam == 4 ]] || ip -n "$ns" addr add "$(nbs_addr "${side:0:1}" 6 "$p")" dev "nbs$p" nodad
}

# nbs_blackhole PATHNO [c|s]: silently drop everything leaving that side on the path (no link event).
nbs_blackhole() {
    local ns
    ns=$(nbs_ns_side "${2:-c}")
    ip netns exec "$ns" nft -f - <<EOF
table inet nbs_blackhole
delete table inet nbs_blackhole
table inet nbs_blackhole {
    chain out { type filter hook output priority 0; oifname "nbs$1" drop; }
    chain in { type filter hook input priority 0; iifname "nbs$1" drop; }
}
EOF
}
nbs_blackhole_clear() { ip netns exec "$(nbs_ns_side "${1:-c}")" nft delete table inet nbs_blackhole 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------------- processes
# nbs_wait_listen NS PORT [TIMEOUT_S]: wait until something listens on TCP PORT inside NS.
nbs_wait_listen() {
    local ns=$1 port=$2 t=${3:-10} i
    for ((i = 0; i < t * 10; i++)); do
        if [[ -n $(ip netns exec "$ns" ss -Hltn "sport = :$port" 2>/dev/null) ]]; then return 0; fi
        sleep 0.1
    done
    nbs_log "nothing listens on port $port in $ns after ${t}s"
    return 1
}

# nbs_bg VAR NS TIMEOUT_S OUT ERR CMD...: start CMD inside NS in the background, bounded by `timeout`,
# stdout to OUT and stderr to ERR; the pid goes to VAR and is killed on exit if still running.
nbs_bg() {
    local -n _pid=$1
    local ns=$2 t=$3 out=$4 err=$5
    shift 5
    ip netns exec "$ns" timeout -k 5 "$t" "$@" >"$out" 2>"$err" </dev/null &
    _pid=$!
    nbs_on_exit "kill $_pid"
}

# nbs_wait_rc VAR PID: wait for a background PID of this shell and store its exit code in VAR
# (never fails under set -e; do not call it inside $(...), a subshell cannot wait for it).
nbs_wait_rc() {
    local -n _rc=$1
    _rc=0
    wait "$2" || _rc=$?
}

# A free-looking TCP port per run (namespaces are fresh, so any port is free there).
nbs_port() { echo $((20000 + RANDOM % 20000)); }

# ---------------------------------------------------------------------------------------------- JSON
# nbs_json FILE EXPR: evaluate a Python expression over `j`, the JSON object on FILE's last non-empty line.
# Example: nbs_json out.json 'j["sha256"]'
nbs_json() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1], encoding="utf-8", errors="replace").read().splitlines() if l.strip()]
if not lines:
    sys.exit("no output in " + sys.argv[1])
j = json.loads(lines[-1])
v = eval(sys.argv[2], {"j": j})
print(json.dumps(v) if isinstance(v, (dict, list)) else v)
EOF
}

# nbs_json_pretty FILE: print the last JSON line of FILE indented.
nbs_json_pretty() {
    python3 - "$1" <<'EOF'
import json, sys
lines = [l for l in open(sys.argv[1], encoding="utf-8", errors="replace").read().splitlines() if l.strip()]
print(json.dumps(json.loads(lines[-1]), indent=2) if lines else "(no output)")
EOF
}

# nbs_tx_bytes NS DEV: transmitted bytes counter of DEV inside NS.
nbs_tx_bytes() { ip netns exec "$1" cat "/sys/class/net/$2/statistics/tx_bytes"; }

# ---------------------------------------------------------------------------------------------- NBS runs
# nbs_serve_bg PIDVAR PORT PREFIX [MODE] [EXTRA ARGS...]: start `nbs-mobility serve --once --json` in the server
# namespace (MODE --sink or --echo, default --sink), stdout to PREFIX.server, stderr to PREFIX.server.err, and
# wait until it listens. Bounded by NBS_TIMEOUT (default 120 s).
nbs_serve_bg() {
    local pv=$1 port=$2 prefix=$3 mode=${4:---sink}
    shift 3; (($#)) && shift
    nbs_bg "$pv" "$NBS_NS_S" "${NBS_TIMEOUT:-120}" "$prefix.server" "$prefix.server.err" \
        "$NBS_BIN" serve --name "$NBS_SERVER_NAME" --port "$port" "$mode" --once --json "$@"
    nbs_wait_listen "$NBS_NS_S" "$port" 15
}

# nbs_connect_bg PIDVAR PORT PREFIX BYTES [EXTRA ARGS...]: start `nbs-mobility connect --bytes BYTES --json` in the
# client namespace, to server.nbs.test:PORT; stdout to PREFIX.client, stderr to PREFIX.client.err.
nbs_connect_bg() {
    local pv=$1 port=$2 prefix=$3 bytes=$4
    shift 4
    nbs_bg "$pv" "$NBS_NS_C" "${NBS_TIMEOUT:-120}" "$prefix.client" "$prefix.client.err" \
        "$NBS_BIN" connect --name "$NBS_CLIENT_NAME" "$NBS_SERVER_NAME:$port" --bytes "$bytes" --json "$@"
}

# nbs_check PREFIX BYTES CLIENT_RC SERVER_RC [check_transfer.py options...]: print PASS/FAIL with the reason
# (and, on failure, the tails of both stderr logs); returns 0 on PASS.
nbs_check() {
    local prefix=$1 bytes=$2 crc=$3 src=$4 rc=0
    shift 4
    python3 "$NBS_LIB_DIR/tools/check_transfer.py" "$prefix.client" "$prefix.server" --bytes "$bytes" \
        --client-rc "$crc" --server-rc "$src" "$@" || rc=$?
    if ((rc != 0)); then
        local f
        for f in "$prefix.client.err" "$prefix.server.err" "$prefix.client" "$prefix.server"; do
            [[ -s $f ]] && { echo "--- tail $f"; tail -n 15 "$f"; }
        done
    fi
    return "$rc"
}

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
# Base topology (interface names are the same inside both namespaces):
#
#   $NBS_NS_C                                         $NBS_NS_S
#   nbs1 192.0.2.1/24     2001:db8:1::1/64  <---->  nbs1 192.0.2.2/24     2001:db8:1::2/64   path 1
#   nbs2 198.51.100.1/24  2001:db8:2::1/64  <---->  nbs2 198.51.100.2/24  2001:db8:2::2/64   path 2
#
# Both namespaces get /etc/netns/NS/hosts with client.nbs.test and server.nbs.test, each naming all the
# global addresses its host has (ip netns exec bind-mounts that file over /etc/hosts).
# Each path is its own directly connected subnet, so no policy routing is needed; with --srcroute each
# host also routes by source address (one table per path), so that a cross pair such as
# 198.51.100.1 -> 192.0.2.2 leaves by nbs2, the interface that owns its source address.
#
# Variants (options of nbs_topology_create, combinable unless said otherwise):
#   --move c|s|cs  that side starts with path 1's addresses only (nbs2 is up, without addresses), so that
#                  nbs_move can delete them and add 198.51.100.11 / 2001:db8:2::11 (client) or
#                  198.51.100.12 / 2001:db8:2::12 (server) on nbs2: a hard move, the only path lost.
#   --srcroute     per-source-address policy routing on both hosts (tables 101 and 102, see nbs_srcroute_refresh).
#   --dns          a third namespace $NBS_NS_D runs dnsmasq on 203.0.113.53, reached by each host over its own
#                  veth `nbsdns` (a scope-link /32 address, so not usable for subflows, no IPv6, and no
#                  forwarding there: it is not a path). The hosts' /etc/netns/NS/resolv.conf names it and their
#                  hosts file has only localhost; nbs_names_publish rewrites the records and reloads (SIGHUP).
#   --nat          the client sits behind a router namespace $NBS_NS_R that masquerades (nft) to the server:
#                    client nbs1 192.0.2.1/24 2001:db8:1::1/64       <-> router nbs1 192.0.2.254 2001:db8:1::254
#                    client nbs2 198.51.100.1/24 2001:db8:2::1/64    <-> router nbs2 198.51.100.254 2001:db8:2::254
#                    router nbsw 203.0.113.254/24 2001:db8:3::254/64 <-> server nbs1 203.0.113.2 2001:db8:3::2
#                  The client has a default route on each link (and per-source tables); the server has no
#                  route to the client's addresses; the router forwards only client-initiated flows.
#                  (Not with --move.)

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
NBS_SUB4=("" 192.0.2.0/24 198.51.100.0/24)
NBS_SUB6=("" 2001:db8:1::/64 2001:db8:2::/64)
# Where nbs_move puts a moved host (on nbs2).
NBS_C4_MOVED=198.51.100.11 NBS_C6_MOVED=2001:db8:2::11
NBS_S4_MOVED=198.51.100.12 NBS_S6_MOVED=2001:db8:2::12
# --nat: the router's client-side addresses per path, and the public side (router nbsw <-> server nbs1).
NBS_R4=("" 192.0.2.254 198.51.100.254)
NBS_R6=("" 2001:db8:1::254 2001:db8:2::254)
NBS_NAT_R4=203.0.113.254 NBS_NAT_R6=2001:db8:3::254
NBS_NAT_S4=203.0.113.2 NBS_NAT_S6=2001:db8:3::2
# --dns: the server's address and each host's (scope link) end of its DNS link.
NBS_DNS4=203.0.113.53 NBS_DNS_C4=203.0.113.201 NBS_DNS_S4=203.0.113.202
export NBS_CLIENT_NAME NBS_SERVER_NAME NBS_IF_1 NBS_IF_2

# Exit code a scenario uses to say "skipped" (the automake convention).
NBS_SKIP=77

nbs_log() { printf '[%s] %s\n' "$(date +%H:%M:%S.%N | cut -c1-12)" "$*" >&2; }
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
# In a ( subshell ), call it again after NBS_CLEANUP=() to give the subshell its own cleanup.
nbs_cleanup_on_exit() {
    trap nbs__run_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# Kill PID only while it is still a background job of this shell (never a reused pid).
nbs__kill_child() {
    local j
    for j in $(jobs -p); do
        if [[ $j == "$1" ]]; then kill "$1" 2>/dev/null || true; fi
    done
    return 0
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

# nbs_require_cmd CMD [WHY]: exit with the skip code unless CMD is on PATH.
nbs_require_cmd() {
    command -v "$1" >/dev/null && return 0
    nbs_log "skip: '$1' not found${2:+ ($2)}"
    exit "$NBS_SKIP"
}

# ---------------------------------------------------------------------------------------------- topology
nbs_c() { ip netns exec "$NBS_NS_C" "$@"; }
nbs_s() { ip netns exec "$NBS_NS_S" "$@"; }
nbs_r() { ip netns exec "$NBS_NS_R" "$@"; }
nbs_d() { ip netns exec "$NBS_NS_D" "$@"; }

# nbs_ns_side c|s|r|d -> namespace name
nbs_ns_side() {
    case $1 in
        c | client) echo "$NBS_NS_C" ;;
        s | server) echo "$NBS_NS_S" ;;
        r | router) echo "${NBS_NS_R:?no router namespace (--nat)}" ;;
        d | dns) echo "${NBS_NS_D:?no DNS namespace (--dns)}" ;;
        *) nbs_die "side must be c or s, not '$1'" ;;
    esac
}

# nbs_tbf NS DEV RATE_MBIT: token bucket on DEV's egress. Burst 15 kB (10 full frames) and 50 ms of queue
# give ~9.5 Mbit/s of TCP goodput at 10 Mbit/s (see bench-aggregation.sh).
nbs_tbf() {
    local ns=$1 dev=$2 rate=$3
    tc -n "$ns" qdisc replace dev "$dev" root tbf rate "${rate}mbit" \
        burst "${NBS_TBF_BURST:-15k}" latency "${NBS_TBF_LATENCY:-50ms}"
}

# nbs_path_rate RATE PATHNO: the Mbit/s of one path in a rate spec: "N" (every path N) or "A+B" (path 1 A,
# path 2 B; unequal paths for the aggregation benchmark). 0 means no limit.
nbs_path_rate() {
    local -a r
    IFS=+ read -ra r <<<"$1"
    [[ ${#r[@]} == 1 ]] && r[1]=${r[0]}
    [[ ${#r[@]} == 2 && ${r[0]} =~ ^[0-9.]+$ && ${r[1]} =~ ^[0-9.]+$ ]] || nbs_die "rate must be N or A+B (Mbit/s), not '$1'"
    echo "${r[$(($2 - 1))]}"
}

# nbs_rate_sum RATE: the summed Mbit/s of both paths of a rate spec (what aggregation can reach at best).
nbs_rate_sum() { awk -v a="$(nbs_path_rate "$1" 1)" -v b="$(nbs_path_rate "$1" 2)" 'BEGIN { print a + b }'; }

# A fresh namespace: lo up, no DAD (link-local addresses included, so nothing is ever tentative), no reverse
# path filter (cross pairs arrive on the "other" interface under --srcroute), TCP Fast Open for clients and
# servers (tcp_fastopen=3, as a server set up for NBS would have it; NBS_FASTOPEN=1 leaves Linux's default,
# clients only), its /etc/netns dir.
nbs__ns_new() {
    local ns=$1
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \
        net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 net.ipv4.tcp_fastopen="${NBS_FASTOPEN:-3}"
    mkdir -p "/etc/netns/$ns"
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"/etc/netns/$ns/hosts"
}

# nbs_topology_create [--rate MBIT|A+B] [--id ID] [--move c|s|cs] [--srcroute] [--dns] [--nat]
# Creates the topology (see the top of this file) and exports NBS_NS_C, NBS_NS_S, NBS_NS_R (--nat, else
# empty), NBS_NS_D (--dns, else empty) and NBS_TOPOLOGY_*. Defaults come from NBS_RATE, NBS_MOVE,
# NBS_SRCROUTE=1, NBS_DNS=1. Registers its own cleanup (call nbs_cleanup_on_exit first so that the cleanup
# also runs on failure).
nbs_topology_create() {
    local rate=${NBS_RATE:-0} id="$$-$RANDOM" move=${NBS_MOVE:-} srcroute=${NBS_SRCROUTE:-0} dns=${NBS_DNS:-0}
    local nat=0 ns
    while (($#)); do
        case $1 in
            --rate) rate=$2; shift 2 ;;
            --id) id=$2; shift 2 ;;
            --move) move=$2; shift 2 ;;
            --srcroute) srcroute=1; shift ;;
            --dns) dns=1; shift ;;
            --nat) nat=1; shift ;;
            *) nbs_die "nbs_topology_create: unknown argument $1" ;;
        esac
    done
    [[ $move =~ ^(c|s|cs|sc)?$ ]] || nbs_die "nbs_topology_create: --move takes c, s or cs, not '$move'"
    nbs_path_rate "$rate" 1 >/dev/null
    if ((nat)); then
        [[ -z $move ]] || nbs_die "nbs_topology_create: --move and --nat do not combine"
        srcroute=1 # two default routes on the client: route by source
    fi
    NBS_NS_C="nbs-c-$id"
    NBS_NS_S="nbs-s-$id"
    NBS_NS_R="" NBS_NS_D=""
    ((nat)) && NBS_NS_R="nbs-r-$id"
    ((dns)) && NBS_NS_D="nbs-d-$id"
    export NBS_NS_C NBS_NS_S NBS_NS_R NBS_NS_D NBS_TOPOLOGY_RATE=$rate NBS_TOPOLOGY_MOVE=$move \
        NBS_TOPOLOGY_SRCROUTE=$srcroute NBS_TOPOLOGY_DNS=$dns NBS_TOPOLOGY_NAT=$nat
    nbs_on_exit nbs_topology_destroy

    for ns in "$NBS_NS_C" "$NBS_NS_S" $NBS_NS_R $NBS_NS_D; do nbs__ns_new "$ns"; done
    if ((nat)); then nbs__topology_nat "$rate"; else nbs__topology_base "$rate" "$move"; fi
    if ((srcroute)); then
        nbs__srcroute_rules c
        ((nat)) || nbs__srcroute_rules s
        nbs_srcroute_refresh
    fi
    ((dns)) && nbs__dns_create
    nbs_wait_links_up 5
    nbs_names_publish
    ((dns)) && nbs__dns_check
    nbs_log "topology up: client ns $NBS_NS_C, server ns $NBS_NS_S${NBS_NS_R:+, router ns $NBS_NS_R (NAT)}${NBS_NS_D:+, DNS ns $NBS_NS_D}, rate ${rate:-0} Mbit/s per path (A+B: path 1, path 2; 0 = unlimited)${move:+, move: $move}$( ((srcroute)) && echo ', source routing')"
}

# Two hosts, two paths. A side named in MOVE gets no addresses on path 2.
nbs__topology_base() {
    local rate=$1 move=$2 i dev side ns r
    for i in 1 2; do
        dev=nbs$i r=$(nbs_path_rate "$rate" "$i")
        ip -n "$NBS_NS_C" link add name "$dev" type veth peer name "$dev" netns "$NBS_NS_S"
        for side in c s; do
            ns=$(nbs_ns_side $side)
            if [[ $i == 1 || $move != *$side* ]]; then
                ip -n "$ns" addr add "$(nbs_addr $side 4 $i)" dev "$dev"
                ip -n "$ns" addr add "$(nbs_addr $side 6 $i)" dev "$dev" nodad
            fi
            ip -n "$ns" link set "$dev" up
            [[ $r == 0 ]] || nbs_tbf "$ns" "$dev" "$r"
        done
    done
}

# Client -- router (masquerade) -- server.
nbs__topology_nat() {
    local rate=$1 i dev r
    for i in 1 2; do
        dev=nbs$i r=$(nbs_path_rate "$rate" "$i")
        ip -n "$NBS_NS_C" link add name "$dev" type veth peer name "$dev" netns "$NBS_NS_R"
        ip -n "$NBS_NS_C" addr add "${NBS_C4[i]}/24" dev "$dev"
        ip -n "$NBS_NS_C" addr add "${NBS_C6[i]}/64" dev "$dev" nodad
        ip -n "$NBS_NS_R" addr add "${NBS_R4[i]}/24" dev "$dev"
        ip -n "$NBS_NS_R" addr add "${NBS_R6[i]}/64" dev "$dev" nodad
        ip -n "$NBS_NS_C" link set "$dev" up
        ip -n "$NBS_NS_R" link set "$dev" up
        if [[ $r != 0 ]]; then
            nbs_tbf "$NBS_NS_C" "$dev" "$r"
            nbs_tbf "$NBS_NS_R" "$dev" "$r"
        fi
        # Path 1 is the client's preferred default route, path 2 the fallback.
        ip -n "$NBS_NS_C" -4 route replace default via "${NBS_R4[i]}" dev "$dev" metric $((100 * i))
        ip -n "$NBS_NS_C" -6 route replace default via "${NBS_R6[i]}" dev "$dev" metric $((100 * i))
    done
    ip -n "$NBS_NS_R" link add name nbsw type veth peer name nbs1 netns "$NBS_NS_S"
    ip -n "$NBS_NS_R" addr add "$NBS_NAT_R4/24" dev nbsw
    ip -n "$NBS_NS_R" addr add "$NBS_NAT_R6/64" dev nbsw nodad
    ip -n "$NBS_NS_S" addr add "$NBS_NAT_S4/24" dev nbs1
    ip -n "$NBS_NS_S" addr add "$NBS_NAT_S6/64" dev nbs1 nodad
    ip -n "$NBS_NS_R" link set nbsw up
    ip -n "$NBS_NS_S" link set nbs1 up
    nbs_r sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    nbs_r nft -f - <<'EOF'
table inet nbs_nat {
    chain nat_out { type nat hook postrouting priority srcnat; policy accept; oifname "nbsw" masquerade; }
    chain filter_fwd {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname { "nbs1", "nbs2" } oifname "nbsw" accept
    }
}
EOF
}

# nbs_wait_links_up [TIMEOUT_S]: wait until every link that is administratively up in our namespaces has
# carrier (operstate up). A veth's carrier follows its peer through the kernel's linkwatch, which can lag
# by up to a second; until then the link counts as down (for netlink listeners too).
nbs_wait_links_up() {
    local t=${1:-5} i ns dev pending
    for ((i = 0; i < t * 20; i++)); do
        pending=""
        for ns in "$NBS_NS_C" "$NBS_NS_S" ${NBS_NS_R:-} ${NBS_NS_D:-}; do
            for dev in $(ip -n "$ns" -o link show up | awk -F': ' '$2 != "lo" { sub(/@.*/, "", $2); print $2 }'); do
                [[ $(ip netns exec "$ns" cat "/sys/class/net/$dev/operstate") == up ]] || pending+=" $ns/$dev"
            done
        done
        [[ -z $pending ]] && return 0
        sleep 0.05
    done
    nbs_log "links still without carrier after ${t}s:$pending"
    return 1
}

# ---- per-source routing (--srcroute)
# Rules, once per host: "from <path P's subnets> lookup table 100+P" (by subnet, so a moved address on nbs2
# is covered too). Routes: see nbs_srcroute_refresh.
nbs__srcroute_rules() {
    local ns p
    ns=$(nbs_ns_side "$1")
    for p in 1 2; do
        ip -n "$ns" -4 rule add pref $((1000 + p)) from "${NBS_SUB4[p]}" lookup $((100 + p))
        ip -n "$ns" -6 rule add pref $((1000 + p)) from "${NBS_SUB6[p]}" lookup $((100 + p))
    done
}

# nbs_srcroute_refresh [c|s ...]: (re)install the routes of the per-source tables (no-op without --srcroute).
# Table 100+P: path P's subnet on nbsP, a default route via the far end of path P (the peer host, or the
# router with --nat; `onlink`, so it works before the address exists), and an unreachable default behind
# it, so that packets from an address of a dead path never leak out of another interface. The kernel
# flushes a device's routes when its link goes down or its last IPv4 address goes, so the path helpers
# (nbs_link_up, nbs_addr_add, nbs_move) call this again; routes that cannot be added now (link down) are
# skipped. Check: nbs_c ip route get 192.0.2.2 from 198.51.100.1  ->  ... dev nbs2
nbs_srcroute_refresh() {
    [[ ${NBS_TOPOLOGY_SRCROUTE:-0} == 1 ]] || return 0
    local sides=("$@") side ns p t dev gw4 gw6
    ((${#sides[@]})) || sides=(c s)
    for side in "${sides[@]}"; do
        [[ $side == s && ${NBS_TOPOLOGY_NAT:-0} == 1 ]] && continue # one link, no tables
        ns=$(nbs_ns_side "$side")
        for p in 1 2; do
            t=$((100 + p)) dev=nbs$p
            if [[ ${NBS_TOPOLOGY_NAT:-0} == 1 ]]; then
                gw4=${NBS_R4[p]} gw6=${NBS_R6[p]}
            elif [[ $side == c ]]; then
                gw4=${NBS_S4[p]} gw6=${NBS_S6[p]}
            else
                gw4=${NBS_C4[p]} gw6=${NBS_C6[p]}
            fi
            ip -n "$ns" -4 route replace unreachable default metric 65535 table "$t"
            ip -n "$ns" -6 route replace unreachable default metric 65535 table "$t"
            ip -n "$ns" -4 route replace "${NBS_SUB4[p]}" dev "$dev" table "$t" 2>/dev/null || true
            ip -n "$ns" -6 route replace "${NBS_SUB6[p]}" dev "$dev" table "$t" 2>/dev/null || true
            ip -n "$ns" -4 route replace default via "$gw4" dev "$dev" onlink table "$t" 2>/dev/null || true
            ip -n "$ns" -6 route replace default via "$gw6" dev "$dev" onlink table "$t" 2>/dev/null || true
        done
    done
}

# ---- names
# Global addresses on the nbsN interfaces of a namespace, one per line (IPv4 first).
nbs__global_addrs() {
    ip -n "$1" -o addr show scope global 2>/dev/null |
        awk '$2 ~ /^nbs[0-9]+$/ && $0 !~ / tentative / { sub(/\/.*/, "", $4); print $3, $4 }' |
        sort -s -k1,1 | awk '{ print $2 }'
}

# The records "ADDRESS NAME": client.nbs.test -> the client's global addresses, server.nbs.test -> the
# server's, as they are right now.
nbs__records() {
    local a
    for a in $(nbs__global_addrs "$NBS_NS_C"); do printf '%s\t%s\n' "$a" "$NBS_CLIENT_NAME"; done
    for a in $(nbs__global_addrs "$NBS_NS_S"); do printf '%s\t%s\n' "$a" "$NBS_SERVER_NAME"; done
}

# nbs_names_publish: make client.nbs.test and server.nbs.test name the hosts' current global addresses.
# Without --dns: rewrites /etc/netns/NS/hosts of both hosts in place (same inode, so processes already
# running in the namespace see the change). With --dns: rewrites dnsmasq's addn-hosts file and reloads it
# with SIGHUP (the hosts files then hold only localhost).
nbs_names_publish() {
    local records ns
    records=$(nbs__records)
    if [[ ${NBS_TOPOLOGY_DNS:-0} == 1 ]]; then
        printf '%s\n' "$records" >"$NBS_DNS_DIR/hosts.new"
        chmod 644 "$NBS_DNS_DIR/hosts.new"
        mv -f "$NBS_DNS_DIR/hosts.new" "$NBS_DNS_DIR/hosts"
        if [[ -s $NBS_DNS_DIR/pid ]]; then kill -HUP "$(cat "$NBS_DNS_DIR/pid")"; fi
    else
        for ns in "$NBS_NS_C" "$NBS_NS_S"; do
            {
                printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
                printf '%s\n' "$records"
            } >"/etc/netns/$ns/hosts"
        done
    fi
    nbs_log "names: $(printf '%s' "$records" | awk '{ a[$2] = a[$2] " " $1 } END { for (n in a) printf "%s ->%s; ", n, a[n] }')"
}

# nbs_resolve SIDE NAME: the addresses NAME resolves to inside that side's namespace, sorted, one line.
nbs_resolve() {
    ip netns exec "$(nbs_ns_side "$1")" getent ahosts "$2" 2>/dev/null | awk '$2 == "STREAM" { print $1 }' | sort -u |
        tr '\n' ' ' | sed 's/ $//'
}

# nbs_wait_resolves SIDE NAME ADDRESS [TIMEOUT_S]: wait until NAME resolves (in SIDE's namespace) to a set
# that contains ADDRESS; prints the milliseconds it took. Fails after TIMEOUT_S (default 5).
nbs_wait_resolves() {
    local side=$1 name=$2 addr=$3 t=${4:-5} t0 i
    t0=$(date +%s%N)
    for ((i = 0; i < t * 20; i++)); do
        if [[ " $(nbs_resolve "$side" "$name") " == *" $addr "* ]]; then
            echo $((($(date +%s%N) - t0) / 1000000))
            return 0
        fi
        sleep 0.05
    done
    nbs_log "$name does not resolve to $addr in $(nbs_ns_side "$side") after ${t}s (it gives: $(nbs_resolve "$side" "$name"))"
    return 1
}

# ---- DNS (--dns)
# dnsmasq in $NBS_NS_D on 203.0.113.53 (lo), one veth per host. Answers for nbs.test only, from an addn-hosts
# file, with TTL 0 and no negative caching, so a change is visible at the next lookup after the SIGHUP.
nbs__dns_create() {
    local side ns peer hostaddr
    ip -n "$NBS_NS_D" addr add "$NBS_DNS4/32" dev lo
    for side in c s; do
        ns=$(nbs_ns_side $side) peer=dns$side
        if [[ $side == c ]]; then hostaddr=$NBS_DNS_C4; else hostaddr=$NBS_DNS_S4; fi
        ip -n "$ns" link add name nbsdns type veth peer name "$peer" netns "$NBS_NS_D"
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.nbsdns.disable_ipv6=1
        ip netns exec "$NBS_NS_D" sysctl -qw "net.ipv6.conf.$peer.disable_ipv6=1"
        ip -n "$ns" addr add "$hostaddr/32" dev nbsdns scope link
        ip -n "$ns" link set nbsdns up
        ip -n "$NBS_NS_D" link set "$peer" up
        ip -n "$ns" route replace "$NBS_DNS4/32" dev nbsdns src "$hostaddr"
        ip -n "$NBS_NS_D" route replace "$hostaddr/32" dev "$peer"
        printf 'nameserver %s\noptions timeout:1 attempts:3\n' "$NBS_DNS4" >"/etc/netns/$ns/resolv.conf"
    done
    NBS_DNS_DIR=$(mktemp -d "${TMPDIR:-/tmp}/nbs-dns.XXXXXX")
    chmod 755 "$NBS_DNS_DIR"
    export NBS_DNS_DIR
    nbs_on_exit "rm -rf '$NBS_DNS_DIR'"
    : >"$NBS_DNS_DIR/hosts"
    chmod 644 "$NBS_DNS_DIR/hosts"
    local -a extra=()
    [[ ${NBS_DNS_LOG_QUERIES:-0} == 1 ]] && extra+=(--log-queries)
    NBS_DNS_PID=""
    nbs_bg NBS_DNS_PID "$NBS_NS_D" "${NBS_TOPOLOGY_TIMEOUT:-3600}" "$NBS_DNS_DIR/dnsmasq.out" "$NBS_DNS_DIR/dnsmasq.err" \
        dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --addn-hosts="$NBS_DNS_DIR/hosts" \
        --listen-address="$NBS_DNS4" --bind-interfaces --port=53 --local=/nbs.test/ --domain-needed \
        --no-negcache --local-ttl=0 --user=root --group=root --pid-file="$NBS_DNS_DIR/pid" \
        --log-facility="$NBS_DNS_DIR/dnsmasq.log" "${extra[@]}"
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s $NBS_DNS_DIR/pid && -n $(nbs_d ss -Hlun "sport = :53" 2>/dev/null) ]] && break
        nbs__pid_alive "$NBS_DNS_PID" || { cat "$NBS_DNS_DIR/dnsmasq.err" >&2; nbs_die "dnsmasq did not start"; }
        sleep 0.1
    done
    [[ -s $NBS_DNS_DIR/pid ]] || nbs_die "dnsmasq did not write its pid file"
}

# Both hosts resolve both names to what was published.
nbs__dns_check() {
    local side name want got
    for side in c s; do
        for name in "$NBS_CLIENT_NAME" "$NBS_SERVER_NAME"; do
            want=$(nbs__records | awk -v n="$name" '$2 == n { print $1 }' | sort -u | tr '\n' ' ' | sed 's/ $//')
            got=$(nbs_resolve $side "$name")
            [[ $got == "$want" ]] || nbs_die "DNS: $name in $(nbs_ns_side $side) resolves to '$got', want '$want'"
        done
    done
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
    nbs_ns_destroy "${NBS_NS_R:-}"
    nbs_ns_destroy "${NBS_NS_D:-}"
    rmdir /etc/netns 2>/dev/null || true
}

# True when PID exists and is not a zombie.
nbs__pid_alive() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z ]]
}

# Remove namespaces left behind by runs that were killed with SIGKILL: nbs-[csrd]-PID-* whose PID is gone.
nbs_gc_stale() {
    local ns pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^nbs-[csrd]-[0-9]+-' || true); do
        pid=${ns#nbs-?-}; pid=${pid%%-*}
        if ! nbs__pid_alive "$pid"; then
            nbs_log "removing stale namespace $ns"
            nbs_ns_destroy "$ns"
        fi
    done
    for ns in /etc/netns/nbs-[csrd]-*; do
        [[ -d $ns ]] || continue
        ip netns list | awk '{print $1}' | grep -qxF "${ns##*/}" || rm -rf "$ns"
    done
    rmdir /etc/netns 2>/dev/null || true
}

# ---------------------------------------------------------------------------------------------- path events
# nbs_link_down PATHNO [c|s]: take a path's veth down (default: on the client; the peer loses carrier).
# As on any Linux host, the kernel then also deletes that side's IPv6 addresses (keep_addr_on_down=0);
# the IPv4 ones stay. The IPv6 addresses it had are remembered for nbs_link_up.
declare -gA NBS__V6_DOWN=()
nbs_link_down() {
    local side=${2:-c} ns
    ns=$(nbs_ns_side "$side")
    NBS__V6_DOWN[$side$1]=$(ip -n "$ns" -6 -o addr show dev "nbs$1" scope global | awk '{ print $4 }' | tr '\n' ' ')
    ip -n "$ns" link set "nbs$1" down
}

# nbs_link_up PATHNO [c|s]: bring it back up, with the IPv6 addresses it lost (by default the path's own).
nbs_link_up() {
    local side=${2:-c} ns a
    ns=$(nbs_ns_side "$side")
    ip -n "$ns" link set "nbs$1" up
    for a in ${NBS__V6_DOWN[$side$1]-$(nbs_addr "${side:0:1}" 6 "$1")}; do
        ip -n "$ns" addr replace "$a" dev "nbs$1" nodad
    done
    nbs_srcroute_refresh "${side:0:1}"
}

# nbs_flap PATHNO COUNT PERIOD_S [c|s]: COUNT times: link down, wait PERIOD_S, link up, wait PERIOD_S.
nbs_flap() {
    local p=$1 n=$2 period=$3 side=${4:-c} i
    for ((i = 1; i <= n && i <= 100; i++)); do
        nbs_link_down "$p" "$side"
        sleep "$period"
        nbs_link_up "$p" "$side"
        sleep "$period"
    done
}

# nbs_addr_storm SIDE COUNT [PAUSE_S]: add COUNT (<= 200) extra addresses on nbs2 of SIDE (198.51.100.20.. /24 and
# 2001:db8:2::1:0.. /64, both families, in one `ip -batch`), wait PAUSE_S (default 0.5), and delete them again.
nbs_addr_storm() {
    local side=$1 n=$2 pause=${3:-0.5} ns i
    ns=$(nbs_ns_side "$side")
    ((n >= 1 && n <= 200)) || nbs_die "nbs_addr_storm: COUNT must be 1..200"
    for ((i = 0; i < n; i++)); do
        printf 'address add 198.51.100.%d/24 dev nbs2\n' $((20 + i))
        printf 'address add 2001:db8:2::1:%x/64 dev nbs2 nodad\n' "$i"
    done | ip -n "$ns" -batch -
    sleep "$pause"
    for ((i = 0; i < n; i++)); do
        printf 'address del 198.51.100.%d/24 dev nbs2\n' $((20 + i))
        printf 'address del 2001:db8:2::1:%x/64 dev nbs2\n' "$i"
    done | ip -n "$ns" -batch -
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
    nbs_srcroute_refresh "${side:0:1}"
}

# nbs_move SIDES [GAP_S]: a hard move of each side in SIDES (c, s or cs), at once: delete its path-1
# addresses (IPv4 and IPv6; with --move that is its only path), wait GAP_S (default 0.5), add its moved
# addresses on nbs2 (client 198.51.100.11/24 2001:db8:2::11/64, server 198.51.100.12/24 2001:db8:2::12/64),
# and publish the names (hosts files or DNS) as they now are.
nbs_move() {
    local who=$1 gap=${2:-0.5} side ns
    for side in $(echo "$who" | grep -o .); do nbs_addr_del 1 all "$side"; done
    sleep "$gap"
    for side in $(echo "$who" | grep -o .); do
        ns=$(nbs_ns_side "$side")
        if [[ $side == c ]]; then
            ip -n "$ns" addr add "$NBS_C4_MOVED/24" dev nbs2
            ip -n "$ns" addr add "$NBS_C6_MOVED/64" dev nbs2 nodad
        else
            ip -n "$ns" addr add "$NBS_S4_MOVED/24" dev nbs2
            ip -n "$ns" addr add "$NBS_S6_MOVED/64" dev nbs2 nodad
        fi
        nbs_srcroute_refresh "$side"
    done
    nbs_names_publish
}

# nbs_blackhole PATHNO[,PATHNO...] [c|s]: silently drop everything leaving and reaching that side on those paths
# (no link event).
nbs_blackhole() {
    local ns ifs
    ns=$(nbs_ns_side "${2:-c}")
    ifs=$(sed -E 's/([0-9]+)/"nbs\1"/g' <<<"$1")
    ip netns exec "$ns" nft -f - <<EOF
table inet nbs_blackhole
delete table inet nbs_blackhole
table inet nbs_blackhole {
    chain out { type filter hook output priority 0; oifname { $ifs } drop; }
    chain in { type filter hook input priority 0; iifname { $ifs } drop; }
}
EOF
}
nbs_blackhole_clear() { ip netns exec "$(nbs_ns_side "${1:-c}")" nft delete table inet nbs_blackhole 2>/dev/null || true; }

# ---------------------------------------------------------------------------------------------- processes
# nbs_wait_listen NS PORT [TIMEOUT_S] [tcp|udp]: wait until something listens on PORT (TCP by default) inside NS.
nbs_wait_listen() {
    local ns=$1 port=$2 t=${3:-10} transport=${4:-tcp} i flags=-Hltn
    [[ $transport == udp ]] && flags=-Hlun
    for ((i = 0; i < t * 10; i++)); do
        if [[ -n $(ip netns exec "$ns" ss "$flags" "sport = :$port" 2>/dev/null) ]]; then return 0; fi
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
    nbs_on_exit "nbs__kill_child $_pid"
}

# nbs_wait_rc VAR PID: wait for a background PID of this shell and store its exit code in VAR
# (never fails under set -e; do not call it inside $(...), a subshell cannot wait for it).
nbs_wait_rc() {
    local -n _rc=$1
    _rc=0
    wait "$2" || _rc=$?
}

# A port to listen on. The namespaces are fresh, so nothing else holds it, but two picks of one run must
# differ (a CI run once gave two listeners of one scenario the same port), and it stays below Linux's
# default ephemeral range (32768-60999) so that a connection's own source port cannot take it first.
# Picks are remembered in $NBS_TMP (nbs_tmpdir) because each call runs in its own $(...) subshell.
nbs_port() {
    local port tries=0 used=${NBS_TMP:+$NBS_TMP/.ports-used}
    while :; do
        port=$((20000 + RANDOM % 12768))
        [[ -n $used ]] && grep -qsx "$port" "$used" && ((++tries < 1000)) && continue
        break
    done
    [[ -n $used ]] && echo "$port" >>"$used"
    echo "$port"
}

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

# nbs_tcp_ext NS COUNTER: a TcpExt counter of the namespace's kernel (/proc/net/netstat: a line of names, a
# line of values), e.g. TCPFastOpenActive.
nbs_tcp_ext() {
    ip netns exec "$1" awk -v want="$2" '$1 == "TcpExt:" { if (!names) { for (i = 2; i <= NF; i++) n[i] = $i; names = 1 }
        else for (i = 2; i <= NF; i++) if (n[i] == want) print $i }' /proc/net/netstat
}

# ---------------------------------------------------------------------------------------------- NBS runs
# NBS_TRANSPORT (tcp or udp, default tcp) is passed to serve and connect as --transport.
# nbs_serve_bg PIDVAR PORT PREFIX [MODE] [EXTRA ARGS...]: start `nbs-mobility serve --once --json` in the server
# namespace (MODE --sink or --echo, default --sink), stdout to PREFIX.server, stderr to PREFIX.server.err, and
# wait until it listens. Bounded by NBS_TIMEOUT (default 120 s).
nbs_serve_bg() {
    local pv=$1 port=$2 prefix=$3 mode=${4:---sink}
    shift 3; (($#)) && shift
    nbs_bg "$pv" "$NBS_NS_S" "${NBS_TIMEOUT:-120}" "$prefix.server" "$prefix.server.err" \
        "$NBS_BIN" serve --name "$NBS_SERVER_NAME" --port "$port" "$mode" --once --json --transport "${NBS_TRANSPORT:-tcp}" "$@"
    nbs_wait_listen "$NBS_NS_S" "$port" 15 "${NBS_TRANSPORT:-tcp}"
}

# nbs_connect_bg PIDVAR PORT PREFIX BYTES [EXTRA ARGS...]: start `nbs-mobility connect --bytes BYTES --json` in the
# client namespace, to server.nbs.test:PORT; stdout to PREFIX.client, stderr to PREFIX.client.err.
nbs_connect_bg() {
    local pv=$1 port=$2 prefix=$3 bytes=$4
    shift 4
    nbs_bg "$pv" "$NBS_NS_C" "${NBS_TIMEOUT:-120}" "$prefix.client" "$prefix.client.err" \
        "$NBS_BIN" connect --name "$NBS_CLIENT_NAME" "$NBS_SERVER_NAME:$port" --bytes "$bytes" --json --transport "${NBS_TRANSPORT:-tcp}" "$@"
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

# nbs_events PREFIX: print the events of both sides' summaries (one line each, with their time).
nbs_events() {
    python3 - "$1.client" "$1.server" <<'EOF'
import json, sys
for path, role in zip(sys.argv[1:], ("client", "server")):
    try:
        lines = [l for l in open(path, encoding="utf-8", errors="replace").read().splitlines() if l.strip()]
        j = json.loads(lines[-1])
    except (OSError, ValueError, IndexError):
        print("%s: no JSON summary" % role)
        continue
    for e in j.get("events") or []:
        print("%s t=%7.3fs %s" % (role, float(e.get("t") or 0), e.get("event")))
EOF
}

# nbs_transfer PREFIX BYTES [CONNECT ARGS...]: `serve --sink --once --json` in the server namespace on a fresh port,
# `connect --bytes BYTES --json [ARGS...]` in the client's, and waits for both. Sets NBS_CRC and NBS_SRC (exit codes).
nbs_transfer() {
    local prefix=$1 bytes=$2 port spid="" cpid=""
    shift 2
    NBS_CRC=0 NBS_SRC=0
    port=$(nbs_port)
    nbs_serve_bg spid "$port" "$prefix" --sink
    nbs_connect_bg cpid "$port" "$prefix" "$bytes" "$@"
    nbs_wait_rc NBS_CRC "$cpid"
    nbs_wait_rc NBS_SRC "$spid"
}

# ---------------------------------------------------------------------------------------------- fault scenarios
# nbs_transfer_with_fault PREFIX BYTES DELAY_S FAULT [CONNECT ARGS...]: `serve --sink --once --json` in the
# server namespace, `connect --bytes BYTES --json [ARGS...]` in the client's, and DELAY_S seconds after the
# client started, while it still runs, the shell command FAULT (eval'd here, so it can call the helpers
# above; it must end by itself). Then waits for both. Sets NBS_CRC and NBS_SRC (exit codes), NBS_FAULT_AT
# (seconds from the client's start to the fault, empty when the client had already ended) and NBS_FAULT_RC.
nbs_transfer_with_fault() {
    local prefix=$1 bytes=$2 delay=$3 fault=$4 port spid="" cpid="" t0
    shift 4
    NBS_CRC=0 NBS_SRC=0 NBS_FAULT_AT="" NBS_FAULT_RC=0
    port=$(nbs_port)
    nbs_serve_bg spid "$port" "$prefix" --sink
    t0=$(date +%s%N)
    nbs_connect_bg cpid "$port" "$prefix" "$bytes" "$@"
    sleep "$delay"
    if nbs__pid_alive "$cpid"; then
        NBS_FAULT_AT=$(awk -v n="$(date +%s%N)" -v t="$t0" 'BEGIN { printf "%.2f", (n - t) / 1e9 }')
        nbs_log "fault at ${NBS_FAULT_AT}s: $fault"
        eval "$fault" || NBS_FAULT_RC=$?
        nbs_log "fault done (exit $NBS_FAULT_RC)"
    else
        nbs_log "the client ended before the fault (${delay}s): raise the byte count"
    fi
    nbs_wait_rc NBS_CRC "$cpid"
    nbs_wait_rc NBS_SRC "$spid"
    nbs_log "client exit $NBS_CRC, server exit $NBS_SRC"
}

# nbs_scenario_start [TOPOLOGY OPTIONS...]: how a scenario starts: root, namespaces and the binary checked (exit 77,
# a skip, without them), cleanup on any exit, a temp dir (NBS_TMP), then nbs_topology_create OPTIONS.
nbs_scenario_start() {
    nbs_require_netns
    nbs_require_bin
    nbs_cleanup_on_exit
    nbs_tmpdir
    nbs_topology_create "$@"
}

# nbs_fault_scenario NAME BOUND_MS FAULT: the common shape of a fault scenario on the base topology: an aggregate
# transfer of NBS_BYTES (default 10 MiB) with FAULT eval'd NBS_FAULT_DELAY (default 2) s in, judged by
# nbs_verdict with NBS_STALL_BOUND_MS (default BOUND_MS) for the stall after the fault.
nbs_fault_scenario() {
    local name=$1 bound=${NBS_STALL_BOUND_MS:-$2} fault=$3 bytes=${NBS_BYTES:-$((10 * 1024 * 1024))}
    export NBS_TIMEOUT=${NBS_TIMEOUT:-60}
    nbs_scenario_start --rate "${NBS_RATE:-10}"
    nbs_transfer_with_fault "$NBS_TMP/xfer" "$bytes" "${NBS_FAULT_DELAY:-2}" "$fault" --policy aggregate
    nbs_verdict "$name" "$NBS_TMP/xfer" "$bytes" "$bound"
}

# nbs_fail REASON: record a failed check of the current scenario (nbs_verdict reports it).
NBS_FAILS=0
nbs_fail() { echo "FAIL: $*"; NBS_FAILS=$((NBS_FAILS + 1)); }

# nbs_verdict NAME PREFIX BYTES BOUND_MS [check_transfer.py options...]: check the transfer PREFIX (both exit
# codes 0, same byte count and SHA-256 on both sides, the receiver's max_stall_ms <= BOUND_MS), that the fault
# happened, and no nbs_fail before; print the events and "PASS NAME: max_stall_ms X ..." or "FAIL NAME ...".
nbs_verdict() {
    local name=$1 prefix=$2 bytes=$3 bound=$4 stall after any
    shift 4
    # BOUND is for the stall the fault causes; any stall of the whole transfer (start-up reordering
    # across subflows included) must stay under NBS_STALL_BOUND_ANY_MS (default 2000 ms, ten times
    # the no-fault baseline) or BOUND, whichever is larger.
    any=${NBS_STALL_BOUND_ANY_MS:-2000}
    ((bound > any)) && any=$bound
    nbs_check "$prefix" "$bytes" "$NBS_CRC" "$NBS_SRC" --max-stall-ms "$any" "$@" || NBS_FAILS=$((NBS_FAILS + 1))
    [[ -n ${NBS_FAULT_AT-} ]] || nbs_fail "the transfer ended before the fault was injected (raise NBS_BYTES)"
    ((${NBS_FAULT_RC:-0} == 0)) || nbs_fail "the fault command failed (exit $NBS_FAULT_RC)"
    echo "--- events"
    nbs_events "$prefix"
    stall=$(nbs_json "$prefix.server" 'j.get("max_stall_ms")' 2>/dev/null || echo "?")
    # The longest gap that ended after the fault (the receiver's clock starts a little after the client's).
    after=$(nbs_json "$prefix.server" "max([s['ms'] for s in j['stalls'] if s['at_s'] + s['ms'] / 1000 >= ${NBS_FAULT_AT:-0} - 0.3] or [0])" \
        2>/dev/null || echo "n/a")
    if [[ $after =~ ^[0-9.]+$ ]] && awk -v a="$after" -v b="$bound" 'BEGIN { exit !(a > b) }'; then
        nbs_fail "the stall after the fault, $after ms, exceeds $bound ms"
    fi
    if ((NBS_FAILS == 0)); then
        echo "PASS $name: max_stall_ms $stall (bound $any ms), after the fault $after ms (bound $bound ms), fault at ${NBS_FAULT_AT}s"
        return 0
    fi
    echo "FAIL $name: max_stall_ms $stall (bound $any ms), after the fault $after ms (bound $bound ms), $NBS_FAILS failed check(s)"
    return 1
}

#!/usr/bin/env bash
# Soak: many concurrent sessions under churn. One `serve --sink` process holds NBS_SOAK_SESSIONS sessions (default
# 200) from one `connect --sessions` process, each sending for NBS_SOAK_SECONDS (default 20; run it by hand with
# 300 or more), in three rounds, while a seeded random schedule (NBS_SOAK_SEED, printed) flaps links, moves the
# client's path-2 addresses and blackholes a path, one fault at a time. Then it checks:
#   - every session of every round completed, and the server received exactly what each client sent (SHA-256);
#   - the server leaked nothing: its open descriptors after round 3 are back at the level before round 1, and its
#     RSS after round 3 is within 25 % (+16 MiB) of the higher of its RSS after rounds 1 and 2 (a leak grows with
#     every round). RSS is a high-water mark (the allocator keeps what it freed), so one round with light faults
#     sets a low mark that a heavier next round exceeds without leaking anything: one round's figure alone is not
#     the level, and with seed 1004149641 a check of round 2 against round 1 failed on a round 1 of blackholes only.
#   - the server still accepts: a fresh session afterwards completes.
# Each session's send buffer is 128 KiB: with 8 MiB (the default) and ~0.5 Mbit/s per session, what a session
# has written when its time is up would take minutes to drain.
# Env: NBS_SOAK_SESSIONS, NBS_SOAK_SECONDS, NBS_SOAK_SEED, NBS_SOAK_TRANSPORT (tcp, the default, or udp: the
# subflows of both ends; else NBS_TRANSPORT, which run-all.sh sets), NBS_RATE (default 50), NBS_BIN.
# transports: tcp udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

sessions=${NBS_SOAK_SESSIONS:-200}
seconds=${NBS_SOAK_SECONDS:-20}
seed=${NBS_SOAK_SEED:-$((RANDOM * 32768 + RANDOM))}
transport=${NBS_SOAK_TRANSPORT:-${NBS_TRANSPORT:-tcp}}
[[ $transport =~ ^(tcp|udp)$ ]] || { echo "the soak's transport (NBS_SOAK_TRANSPORT, else NBS_TRANSPORT) must be tcp or udp, not '$transport'" >&2; exit 2; }
export NBS_TIMEOUT=$((seconds * 3 + 120))

nbs_require_netns
nbs_require_bin
nbs_cleanup_on_exit
nbs_tmpdir
nbs_topology_create --rate "${NBS_RATE:-50}"
echo "soak: $sessions sessions x 3 rounds of ${seconds}s, seed $seed, $transport subflows"
RANDOM=$seed

port=$(nbs_port)
spid=""
# The serve lives through all three rounds, each bounded by NBS_TIMEOUT: under its own bound it was
# killed during round 2 after a slow round 1 (sessions waiting out their grace period), and every
# later session failed for that instead of for whatever slowed round 1.
nbs_bg spid "$NBS_NS_S" $((NBS_TIMEOUT * 3 + 60)) "$NBS_TMP/server" "$NBS_TMP/server.err" \
    "$NBS_BIN" serve --name "$NBS_SERVER_NAME" --port "$port" --sink --json --transport "$transport"
nbs_wait_listen "$NBS_NS_S" "$port" 15 "$transport"
# nbs_bg's pid is `timeout`; the server is its child.
server=""
for ((i = 0; i < 50 && ${#server} == 0; i++)); do server=$(pgrep -P "$spid" -f "nbs-mobility serve" || true); sleep 0.1; done
[[ -n $server ]] || nbs_die "cannot find the server process"
fds() { ls "/proc/$server/fd" | wc -l; }
rss() { awk '/^VmRSS/ { print $2 }' "/proc/$server/status"; } # KiB

c4=${NBS_C4[2]} c6=${NBS_C6[2]} moves=0
fault() {
    case $((RANDOM % 3)) in
        0)
            local p=$((RANDOM % 2 + 1))
            echo "  flap path $p"
            nbs_link_down "$p" c
            sleep 1
            nbs_link_up "$p" c
            ;;
        1)
            moves=$((moves + 1))
            local n4="198.51.100.$((40 + moves % 200))" n6="2001:db8:2::$(printf '%x' $((0x40 + moves % 200)))"
            echo "  move path 2: $c4 -> $n4, $c6 -> $n6"
            ip -n "$NBS_NS_C" addr del "$c4/24" dev nbs2 2>/dev/null || true
            ip -n "$NBS_NS_C" addr del "$c6/64" dev nbs2 2>/dev/null || true
            sleep 0.3
            ip -n "$NBS_NS_C" addr add "$n4/24" dev nbs2
            ip -n "$NBS_NS_C" addr add "$n6/64" dev nbs2 nodad
            c4=$n4 c6=$n6
            ;;
        2)
            local p=$((RANDOM % 2 + 1))
            echo "  blackhole path $p for 2 s"
            nbs_blackhole "$p" c
            sleep 2
            nbs_blackhole_clear c
            ;;
    esac
}

faults=0
# All sessions open at once, before the first fault (1-3 s in): the soak is about sessions living through
# churn. An OPEN made while a blackhole holds its first bytes for longer than the listener's legacy-detection
# delay is taken for a silent legacy client and fails (README, "Known limits"); with connect's default of 64
# opens at a time, the later opens met the faults, and CI failed on it once.
round() { # round N: the client's sessions, with faults until it ends (at most 100 faults)
    local r=$1 cpid="" crc=0 n
    nbs_bg cpid "$NBS_NS_C" "$NBS_TIMEOUT" "$NBS_TMP/client$r" "$NBS_TMP/client$r.err" \
        "$NBS_BIN" connect --name "$NBS_CLIENT_NAME" "$NBS_SERVER_NAME:$port" --sessions "$sessions" --duration "$seconds" \
        --send-buffer 128K --json --open-concurrency "$sessions" --transport "$transport"
    for ((n = 0; n < 100; n++)); do
        sleep "$((RANDOM % 3 + 1))"
        nbs__pid_alive "$cpid" || break
        # Leave the last seconds quiet, so that the sessions end on a settled network.
        (($(date +%s) < round_end - 3)) || break
        fault
        faults=$((faults + 1))
    done
    nbs_wait_rc crc "$cpid"
    echo "round $r: client exit $crc"
    if ((crc != 0)); then
        nbs_fail "round $r: client exit $crc"
        # A crash: what the runtime's backtracer said, else the last lines.
        grep -m1 -E "Fatal error|Program crashed" "$NBS_TMP/client$r.err" || tail -5 "$NBS_TMP/client$r.err"
        awk '/ crashed:$/ { p = 1 } p && n++ < 30' "$NBS_TMP/client$r.err"
    fi
}

fd0=$(fds)
round_end=$(($(date +%s) + seconds))
round 1
sleep 2
fd1=$(fds) rss1=$(rss)
round_end=$(($(date +%s) + seconds))
round 2
sleep 2
rss2=$(rss)
round_end=$(($(date +%s) + seconds))
round 3
sleep 3
rss3=$(rss)
# A JOIN from an address that is deleted right after it connects never sends a byte: the listener
# takes it for a silent legacy client, and the sink application holds it as a plain TCP server
# would, until TCP keepalive (about 90 s) finds the peer gone. Those are counted, not leaks: connections
# still established with client addresses that no longer exist.
# The descriptors get up to 20 s to come back: a client's FIN that met a blackhole is resent with
# backoff after the client has exited (seed 240903171: three such connections still open 3 s after
# round 3). A leak stays.
stale_connections() {
    local current
    current=$(ip -n "$NBS_NS_C" -o addr show scope global | awk '{ sub("/.*", "", $4); print $4 }' | tr '\n' ' ')
    nbs_s ss -Htn state established "( sport = :$port )" | awk -v cur=" $current " '{
        peer = $4; sub(/:[0-9]+$/, "", peer); gsub(/^\[|\]$/, "", peer); sub(/^::ffff:/, "", peer)
        if (index(cur, " " peer " ") == 0) n++ } END { print n + 0 }'
}
# A UDP listener keeps one socket per address of its own that subflows were made to (DatagramListener),
# for its whole life: up to four here, made in round 1 and not more after it.
address_sockets=0
[[ $transport == udp ]] && address_sockets=$((${#NBS_S4[@]} - 1 + ${#NBS_S6[@]} - 1))
for ((waited = 0; ; waited++)); do
    fd3=$(fds) stale=$(stale_connections)
    allowed=$((fd0 + 2 + stale + address_sockets))
    ((fd3 > allowed && waited < 20)) || break
    sleep 1
done
echo "server descriptors: $fd0 before, $fd1 after round 1, $fd3 after round 3 (+${waited}s); RSS ${rss1} KiB after round 1, ${rss2} KiB after round 2, ${rss3} KiB after round 3"
echo "connections still held from client addresses that no longer exist: $stale"
if ((fd3 > allowed)); then
    nbs_fail "the server holds $fd3 descriptors after the soak, $fd0 before (+ $stale held from vanished addresses, + $address_sockets UDP address sockets allowed)"
    # What they are: sockets the server still holds, and the descriptor table.
    nbs_s ss -tnp state established state close-wait 2>/dev/null | grep -v "^State" | awk '{print "  " $1, $4, $5}' | sort | uniq -c | sort -rn | head -20 || true
    # Their timers and counters on both ends (is a FIN on its way? did the client's side ever exist?).
    nbs_s ss -tnoi state established "( sport = :$port )" 2>/dev/null | head -20 || true
    nbs_c ss -tnoa "( dport = :$port )" 2>/dev/null | head -20 || true
    ls -l "/proc/$server/fd" 2>/dev/null | awk '{print "  " $NF}' | sed 's/\[[0-9]*\]//' | sort | uniq -c || true
fi
rss_level=$((rss1 > rss2 ? rss1 : rss2))
((rss3 <= rss_level * 5 / 4 + 16384)) || nbs_fail "the server's RSS grew from ${rss_level} KiB (the higher of rounds 1 and 2) to ${rss3} KiB in round 3"

# Still accepting?
xpid="" xrc=0
nbs_bg xpid "$NBS_NS_C" 60 "$NBS_TMP/last" "$NBS_TMP/last.err" \
    "$NBS_BIN" connect --name "$NBS_CLIENT_NAME" "$NBS_SERVER_NAME:$port" --bytes 1M --json --transport "$transport"
nbs_wait_rc xrc "$xpid"
((xrc == 0)) || nbs_fail "a fresh session after the soak failed (exit $xrc)"
sleep 0.5
# A server session whose peer's last DATA_ACK and CLOSE were lost with its subflows ends (as closed) only at
# its close timeout, 30 s after the peer went: its report may still be due.
for ((waited = 0; waited < 40; waited++)); do
    reports=$(grep '^{' "$NBS_TMP/server" | grep -vc '\.arpa"' || true)
    ((reports < 3 * sessions + 1)) || break
    sleep 1
done
((waited == 0)) || echo "waited ${waited}s for the server's last session reports"

python3 - "$NBS_TMP" "$sessions" <<'PY' || NBS_FAILS=$((NBS_FAILS + 1))
import collections, json, sys
tmp, sessions = sys.argv[1], int(sys.argv[2])
def lines(path):
    out = []
    for line in open(path, encoding="utf-8", errors="replace"):
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out
clients = lines(tmp + "/client1") + lines(tmp + "/client2") + lines(tmp + "/client3") + lines(tmp + "/last")
servers = lines(tmp + "/server")
# A subflow whose first bytes come later than legacyDetectionDelay is taken for a legacy client and
# reset (the opener retries): the server application sees it as a failed legacy session. Counted, not
# matched against the clients' sessions.
spurious = [s for s in servers if str(s.get("peer_name", "")).endswith(".arpa")]
servers = [s for s in servers if not str(s.get("peer_name", "")).endswith(".arpa")]
print("connections taken for legacy clients and reset: %d" % len(spurious))
fails = []
bad = [c for c in clients if not c.get("completed")]
if bad:
    fails.append("%d client sessions did not complete (first: %s)" % (len(bad), bad[0].get("error")))
if len(clients) != 3 * sessions + 1:
    fails.append("%d client reports, expected %d" % (len(clients), 3 * sessions + 1))
sent = collections.Counter((c.get("bytes"), c.get("sha256")) for c in clients if c.get("completed"))
got = collections.Counter((s.get("bytes"), s.get("sha256")) for s in servers if s.get("completed"))
if sent != got:
    fails.append("what the server received differs from what the clients sent: %d sent, %d received, %d unmatched"
                 % (sum(sent.values()), sum(got.values()), sum((sent - got).values()) + sum((got - sent).values())))
    for (b, h), n in (sent - got).items():
        print("  sent, not received: %s bytes sha256 %s (x%d)" % (b, (h or "?")[:16], n))
    for (b, h), n in (got - sent).items():
        print("  received, not sent: %s bytes sha256 %s (x%d)" % (b, (h or "?")[:16], n))
    failed_servers = [s for s in servers if not s.get("completed")]
    print("  server sessions not completed: %d%s" % (len(failed_servers), (" (first: %s)" % failed_servers[0].get("error")) if failed_servers else ""))
    # What the first one went through, for a failure seen only in CI's last lines.
    for failed in failed_servers[:1]:
        print("  its statistics: %s" % {k: failed.get(k) for k in ("bytes", "seconds", "max_stall_ms", "reinjected_bytes", "subflows_max")})
        for e in (failed.get("events") or [])[-20:]:
            print("    t=%7.3fs %s" % (e.get("t", 0), e.get("event")))
total = sum(c.get("bytes", 0) for c in clients)
reinjected = sum(c.get("reinjected_bytes", 0) for c in clients)
print("sessions checked: %d, %.1f MiB in all, %.1f MiB reinjected, longest receiver stall %.0f ms"
      % (len(clients), total / 1048576, reinjected / 1048576, max([s.get("max_stall_ms", 0) for s in servers] or [0])))
for f in fails:
    print("FAIL: " + f)
sys.exit(1 if fails else 0)
PY

if ((NBS_FAILS)); then
    echo "FAIL soak: $NBS_FAILS failed check(s), seed $seed"
    exit 1
fi
echo "PASS soak: $sessions sessions x 3 rounds of ${seconds}s over $transport subflows, $faults faults (seed $seed), every byte accounted for; server fds $fd0 -> $fd3 ($stale from vanished addresses), RSS ${rss1} -> ${rss2} -> ${rss3} KiB; still accepting"

#!/usr/bin/env bash
# Mobility for an unmodified program: a plain socat client pushes NBS_BYTES (default 32 MiB) of pseudo-random
# data through `nbs-mobility proxy` (client namespace, listening on 127.0.0.1) to `proxy --serve` (server
# namespace), which forwards it to a plain socat sink writing a file. ~3 s in, the client makes a hard move
# (`--move c`: its only addresses deleted, 0.5 s later new ones on nbs2). Neither socat knows: their TCP
# connections are to 127.0.0.1 and never move. Checks: both socats exit 0, the file's SHA-256 equals the
# data's, the fault came mid-transfer, a subflow from a moved address came up, both proxies' JSON lines say
# completed with the full byte count, and the sink's longest stall after the move stays under
# NBS_STALL_BOUND_MS (default 10000 ms, as hard-move).
# Env: NBS_BYTES, NBS_RATE (tbf Mbit/s per path, default 20), NBS_FAULT_DELAY (s, default 3), NBS_MOVE_GAP
#      (s without any address, default 0.5), NBS_TIMEOUT (s per process, default 120), NBS_BIN.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((32 * 1024 * 1024))}
bound=${NBS_STALL_BOUND_MS:-10000}
export NBS_TIMEOUT=${NBS_TIMEOUT:-120}

for cmd in socat sha256sum python3; do nbs_require_cmd "$cmd" "netns-scripts/install.sh installs it"; done
nbs_scenario_start --rate "${NBS_RATE:-20}" --move c
T=$NBS_TMP
# Set by nbs_bg and nbs_wait_rc through namerefs.
sinkpid="" smpid="" sendpid="" src=0 krc=0
sum() { sha256sum "$1" | cut -d' ' -f1; }

head -c "$bytes" /dev/urandom >"$T/send.bin"
want=$(sum "$T/send.bin")
ps=$(nbs_port) pn=$(nbs_port) pl=$(nbs_port)

nbs_bg sinkpid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/sink.out" "$T/sink.err" socat -u "TCP-LISTEN:$ps,bind=127.0.0.1,reuseaddr" "CREATE:$T/recv.bin"
nbs_bg sppid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/sproxy.out" "$T/sproxy.err" \
    "$NBS_BIN" proxy --serve --name "$NBS_SERVER_NAME" --port "$pn" --forward "127.0.0.1:$ps" --json
nbs_bg cppid "$NBS_NS_C" "$NBS_TIMEOUT" "$T/cproxy.out" "$T/cproxy.err" \
    "$NBS_BIN" proxy --name "$NBS_CLIENT_NAME" --listen "127.0.0.1:$pl" --to "$NBS_SERVER_NAME:$pn" --json
nbs_wait_listen "$NBS_NS_S" "$ps" 15
nbs_wait_listen "$NBS_NS_S" "$pn" 15
nbs_wait_listen "$NBS_NS_C" "$pl" 15

# The sink file's size every 50 ms, to find the stall the move causes.
# shellcheck disable=SC2016 # expanded by the sampler's own shell
nbs_bg smpid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/samples" /dev/null \
    bash -c 'while :; do echo "$(date +%s%N) $(stat -c %s "$0" 2>/dev/null || echo 0)"; sleep 0.05; done' "$T/recv.bin"

t0=$(date +%s%N)
nbs_bg sendpid "$NBS_NS_C" "$NBS_TIMEOUT" "$T/send.out" "$T/send.err" socat -u "OPEN:$T/send.bin" "TCP:127.0.0.1:$pl"
sleep "${NBS_FAULT_DELAY:-3}"
fault_at="" at_fault=0
if nbs__pid_alive "$sendpid"; then
    at_fault=$(stat -c %s "$T/recv.bin" 2>/dev/null || echo 0)
    fault_ns=$(date +%s%N)
    fault_at=$(awk -v n="$fault_ns" -v t="$t0" 'BEGIN { printf "%.2f", (n - t) / 1e9 }')
    nbs_log "hard move at ${fault_at}s, $at_fault of $bytes bytes delivered"
    nbs_move c "${NBS_MOVE_GAP:-0.5}"
    # A subflow from a moved address, to the serving proxy.
    moved=""
    for ((i = 0; i < 100; i++)); do
        moved=$(nbs_c ss -Htn state established "( dport = :$pn )" | grep -E "$NBS_C4_MOVED|$NBS_C6_MOVED" | head -1 || true)
        [[ -n $moved ]] && break
        sleep 0.1
    done
    echo "after the move: ${moved:-no subflow from a moved address}"
    [[ -n $moved ]] || nbs_fail "no TCP subflow from $NBS_C4_MOVED or $NBS_C6_MOVED within 10 s of the move"
else
    nbs_fail "the transfer ended before the move (raise NBS_BYTES or lower NBS_RATE)"
fi
nbs_wait_rc src "$sendpid"
nbs_wait_rc krc "$sinkpid"
t1=$(date +%s%N)
sleep 0.5 # the proxies print their line once the session has closed
nbs__kill_child "$smpid"

got=$(sum "$T/recv.bin" 2>/dev/null || echo none)
size=$(stat -c %s "$T/recv.bin" 2>/dev/null || echo 0)
secs=$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.2f", (a - b) / 1e9 }')
echo "sender exit $src, sink exit $krc, $size of $bytes bytes in ${secs}s, sha256 ${got:0:16} (want ${want:0:16})"
[[ $src == 0 ]] || nbs_fail "the plain sender (socat) exited $src"
[[ $krc == 0 ]] || nbs_fail "the plain sink (socat) exited $krc"
[[ $got == "$want" ]] || nbs_fail "the sink's file differs: $size bytes, sha256 $got, want $want"
((at_fault < bytes)) || nbs_fail "the move came after the last byte"

stall=$(python3 - "$T/samples" "${fault_ns:-0}" <<'PY'
import sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 2]
fault = int(sys.argv[2])
worst, last_t, last_n = 0, None, None
for t, n in rows:
    if last_n is None or n != last_n:
        if last_t is not None and t >= fault and last_n is not None and last_n > 0:
            worst = max(worst, (t - last_t) // 1_000_000)
        last_t, last_n = t, n
print(worst)
PY
)
echo "longest stall of the sink after the move: ${stall} ms (bound $bound ms; 50 ms samples)"
((stall <= bound)) || nbs_fail "the stall after the move, $stall ms, exceeds $bound ms"

check=$(python3 - "$T/cproxy.out" "$T/sproxy.out" "$bytes" <<'PY'
import json, sys
def lines(path):
    return [json.loads(l) for l in open(path).read().splitlines() if l.strip().startswith("{")]
c, s, n = lines(sys.argv[1]), lines(sys.argv[2]), int(sys.argv[3])
ok_c = len(c) == 1 and c[0]["completed"] and c[0]["bytes_to_peer"] == n and not c[0]["legacy"]
ok_s = len(s) == 1 and s[0]["completed"] and s[0]["bytes_from_peer"] == n and not s[0]["legacy"]
print("ok" if ok_c and ok_s else "client %s server %s" % (c, s))
PY
)
[[ $check == ok ]] || nbs_fail "the proxies' JSON lines do not show one completed NBS session of $bytes bytes: $check"

if ((NBS_FAILS == 0)); then
    echo "PASS legacy-proxy-move: $bytes bytes through the proxies in ${secs}s, hard move at ${fault_at}s, stall after it ${stall} ms (bound $bound ms), sha256 equal"
    exit 0
fi
for f in "$T"/*.err; do [[ -s $f ]] && { echo "--- tail $f"; tail -n 10 "$f"; }; done
echo "FAIL legacy-proxy-move: $NBS_FAILS failed check(s)"
exit 1

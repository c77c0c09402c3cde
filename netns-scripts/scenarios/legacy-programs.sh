#!/usr/bin/env bash
# Legacy programs both ways, on the base topology (no rate limit): Name Based Sockets must never break a plain
# TCP peer. Each check compares SHA-256 sums of what went in and what came out.
#  1. socat and nc (netcat-openbsd), plain clients that speak first, against `serve --echo` (an NBS listener):
#     each becomes a legacy session named 1.2.0.192.in-addr.arpa.
#  2. A silent client (`nc -d`, it never sends) behind which `proxy --serve` forwards to a server that speaks
#     first: the banner must reach it (the listener takes silence for legacy after legacyDetectionDelay).
#  3. curl against `proxy --serve` (a legacy client of an NBS listener) forwarding to python3's http.server.
#  4. An NBS opener against a socat echo server: `proxy --legacy fallback` falls back (the server echoes our
#     OPEN, so a fresh plain connection is made), twice, the second time from the cache without any NBS byte.
#  5. The default `--legacy nbs-only` against the same server: the plain client is closed, the JSON line
#     says why.
#  6. `--legacy legacy-only`: a recording server (socat + tee) must never see the NBS magic.
#  7. `proxy --legacy fallback` against `serve --echo`, twice; the second time (a Fast Open SYN carrying the
#     OPEN) the server's nft drops the first SYN from each address: Linux resends it after 1 s, as the
#     opener's silence timer runs out; it must stay NBS.
# Env: NBS_BYTES (default 4 MiB), NBS_TIMEOUT (s per process, default 60), NBS_BIN.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((4 * 1024 * 1024))}
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

for cmd in socat nc curl python3 sha256sum; do nbs_require_cmd "$cmd" "netns-scripts/install.sh installs it"; done
nbs_scenario_start
T=$NBS_TMP
S4=${NBS_S4[1]}
# Set by nbs_bg and nbs_wait_rc through namerefs.
epid="" erc=0
sum() { sha256sum "$1" | cut -d' ' -f1; }
# Every line of FILE is a JSON object; evaluate EXPR over `lines` (the list of objects).
json_lines() {
    python3 - "$1" "$2" <<'PY'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]).read().splitlines() if l.strip().startswith("{")]
print(eval(sys.argv[2], {"lines": lines}))
PY
}

head -c "$bytes" /dev/urandom >"$T/in.bin"
want=$(sum "$T/in.bin")

# ---- 1. socat and nc against an NBS listener (one `serve --once` each: its JSON line comes at its exit)
for prog in socat nc; do
    pe=$(nbs_port)
    nbs_bg epid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/echo-$prog.out" "$T/echo-$prog.err" \
        "$NBS_BIN" serve --name "$NBS_SERVER_NAME" --port "$pe" --echo --once --json
    nbs_wait_listen "$NBS_NS_S" "$pe" 15
    rc=0
    if [[ $prog == socat ]]; then
        nbs_c timeout 30 socat -t 10 - "TCP:$S4:$pe" <"$T/in.bin" >"$T/$prog.out" || rc=$?
    else
        nbs_c timeout 30 nc -N -w 10 "$S4" "$pe" <"$T/in.bin" >"$T/$prog.out" || rc=$?
    fi
    nbs_wait_rc erc "$epid"
    got=$(sum "$T/$prog.out")
    [[ $rc == 0 && $erc == 0 && $got == "$want" ]] || nbs_fail "$prog -> serve --echo: exit $rc (server $erc), sha256 $got, want $want"
    peer=$(nbs_json "$T/echo-$prog.out" "(j.get('peer_name'), j.get('peer_verification'), j.get('bytes'), j.get('completed'))" 2>/dev/null || echo "no JSON")
    echo "$prog -> serve --echo: exit $rc, $(stat -c %s "$T/$prog.out") bytes echoed, sha256 ${got:0:16}; server saw (name, verification, bytes, completed) = $peer"
    [[ $peer == "('1.2.0.192.in-addr.arpa', 'claimed', $bytes, True)" ]] || nbs_fail "$prog: serve --echo should report a completed legacy session from 1.2.0.192.in-addr.arpa, got $peer"
done

# ---- 2. a silent client gets the banner of a server that speaks first
pb=$(nbs_port) pbp=$(nbs_port)
printf '#!/bin/sh\nprintf "220 legacy.test ready\\r\\n"\nexec cat\n' >"$T/banner.sh"
chmod +x "$T/banner.sh"
nbs_bg bpid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/banner.out" "$T/banner.err" socat "TCP-LISTEN:$pb,bind=127.0.0.1,reuseaddr,fork" "EXEC:$T/banner.sh"
nbs_bg bppid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/bproxy.out" "$T/bproxy.err" \
    "$NBS_BIN" proxy --serve --name "$NBS_SERVER_NAME" --port "$pbp" --forward "127.0.0.1:$pb" --json
nbs_wait_listen "$NBS_NS_S" "$pb" 15
nbs_wait_listen "$NBS_NS_S" "$pbp" 15
nbs_c timeout 3 nc -d "$S4" "$pbp" >"$T/silent.out" || true
if grep -q '^220 legacy.test ready' "$T/silent.out"; then
    echo "silent nc -> proxy --serve: got the banner"
else
    nbs_fail "a silent client did not get the banner within 3 s (got: $(head -c 80 "$T/silent.out" | od -c | head -2))"
fi

# ---- 3. curl -> proxy --serve (legacy client of an NBS listener) -> http.server
ph=$(nbs_port) php=$(nbs_port)
mkdir -p "$T/www"
cp "$T/in.bin" "$T/www/in.bin"
nbs_bg hpid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/http.out" "$T/http.err" python3 -m http.server "$ph" --bind 127.0.0.1 --directory "$T/www"
nbs_bg hppid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/hproxy.out" "$T/hproxy.err" \
    "$NBS_BIN" proxy --serve --name "$NBS_SERVER_NAME" --port "$php" --forward "127.0.0.1:$ph" --json
nbs_wait_listen "$NBS_NS_S" "$ph" 15
nbs_wait_listen "$NBS_NS_S" "$php" 15
rc=0
nbs_c curl -sS --max-time 30 -o "$T/curl.out" "http://$S4:$php/in.bin" || rc=$?
got=$(sum "$T/curl.out" 2>/dev/null || echo none)
[[ $rc == 0 && $got == "$want" ]] || nbs_fail "curl -> proxy --serve -> http.server: exit $rc, sha256 $got, want $want"
echo "curl -> proxy --serve -> http.server: exit $rc, sha256 ${got:0:16}"

# ---- 4. NBS opener -> socat echo server, with fallback (twice: the second from the cache)
ps=$(nbs_port) pl=$(nbs_port)
nbs_bg spid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/secho.out" "$T/secho.err" socat "TCP-LISTEN:$ps,reuseaddr,fork" EXEC:cat
nbs_bg fpid "$NBS_NS_C" "$NBS_TIMEOUT" "$T/fproxy.out" "$T/fproxy.err" \
    "$NBS_BIN" proxy --name "$NBS_CLIENT_NAME" --listen "127.0.0.1:$pl" --to "$NBS_SERVER_NAME:$ps" --legacy fallback --json
nbs_wait_listen "$NBS_NS_S" "$ps" 15
nbs_wait_listen "$NBS_NS_C" "$pl" 15
for i in 1 2; do
    rc=0
    nbs_c timeout 30 socat -t 10 - "TCP:127.0.0.1:$pl" <"$T/in.bin" >"$T/fallback$i.out" || rc=$?
    got=$(sum "$T/fallback$i.out")
    [[ $rc == 0 && $got == "$want" ]] || nbs_fail "socat -> proxy --legacy fallback -> socat echo (#$i): exit $rc, sha256 $got, want $want"
    echo "socat -> proxy --legacy fallback -> socat echo (#$i): exit $rc, sha256 ${got:0:16}"
done
sleep 0.5
legacy=$(json_lines "$T/fproxy.out" "sum(1 for j in lines if j.get('legacy') and j.get('completed') and j.get('bytes_to_peer') == $bytes)")
fallbacks=$(grep -c 'does not speak NBS' "$T/fproxy.err" || true)
echo "fallback proxy: $legacy completed legacy session(s), $fallbacks fallback(s) logged"
((legacy == 2)) || nbs_fail "the fallback proxy should report 2 completed legacy sessions, got $legacy"
((fallbacks == 1)) || nbs_fail "the second connection should go straight to plain TCP (cache): $fallbacks fallbacks logged"

# ---- 5. nbs-only (the default) refuses the legacy server with a reason
pn=$(nbs_port)
nbs_bg npid "$NBS_NS_C" "$NBS_TIMEOUT" "$T/nproxy.out" "$T/nproxy.err" \
    "$NBS_BIN" proxy --name "$NBS_CLIENT_NAME" --listen "127.0.0.1:$pn" --to "$NBS_SERVER_NAME:$ps" --json
nbs_wait_listen "$NBS_NS_C" "$pn" 15
nbs_c timeout 10 socat -t 5 - "TCP:127.0.0.1:$pn" <<<"hello" >"$T/nbsonly.out" || true
sleep 0.3
refused=$(json_lines "$T/nproxy.out" "sum(1 for j in lines if not j.get('completed') and 'does not speak NBS' in j.get('error', ''))")
echo "nbs-only proxy: $refused connection(s) refused as legacy; error: $(json_lines "$T/nproxy.out" "lines[-1].get('error') if lines else None")"
((refused == 1)) || nbs_fail "nbs-only should refuse the legacy server with a 'does not speak NBS' error"
[[ ! -s $T/nbsonly.out ]] || nbs_fail "nbs-only passed bytes through: $(head -c 60 "$T/nbsonly.out")"

# ---- 6. legacy-only never sends the NBS magic
pr=$(nbs_port) plo=$(nbs_port)
nbs_bg rpid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/rec.out" "$T/rec.err" socat "TCP-LISTEN:$pr,reuseaddr,fork" SYSTEM:"tee -a '$T/seen.bin'"
nbs_bg lpid "$NBS_NS_C" "$NBS_TIMEOUT" "$T/lproxy.out" "$T/lproxy.err" \
    "$NBS_BIN" proxy --name "$NBS_CLIENT_NAME" --listen "127.0.0.1:$plo" --to "$NBS_SERVER_NAME:$pr" --legacy legacy-only --json
nbs_wait_listen "$NBS_NS_S" "$pr" 15
nbs_wait_listen "$NBS_NS_C" "$plo" 15
rc=0
nbs_c timeout 30 socat -t 10 - "TCP:127.0.0.1:$plo" <"$T/in.bin" >"$T/legacyonly.out" || rc=$?
got=$(sum "$T/legacyonly.out")
seen=$(sum "$T/seen.bin" 2>/dev/null || echo none)
[[ $rc == 0 && $got == "$want" ]] || nbs_fail "socat -> proxy --legacy legacy-only -> recorder: exit $rc, sha256 $got, want $want"
[[ $seen == "$want" ]] || nbs_fail "the recorder saw other bytes than the application's (NBS bytes?): sha256 $seen"
echo "legacy-only: the server saw exactly the application's $(stat -c %s "$T/seen.bin" 2>/dev/null || echo 0) bytes"

# ---- 7. fallback against an NBS server whose SYN is lost
# A first session fetches the server's Fast Open cookie, so the second one's connect returns at once and
# its SYN carries the OPEN; the server's nft drops that SYN (the first from each address since). Linux sends
# it again after 1 s, just when the opener's silence timer (legacyDetectionDelay, 1 s) runs out: the server
# must still be taken for what it is.
pf=$(nbs_port) pfl=$(nbs_port)
nbs_bg sepid "$NBS_NS_S" "$NBS_TIMEOUT" "$T/synloss-serve.out" "$T/synloss-serve.err" \
    "$NBS_BIN" serve --name "$NBS_SERVER_NAME" --port "$pf" --echo --json
nbs_bg sfpid "$NBS_NS_C" "$NBS_TIMEOUT" "$T/synloss-proxy.out" "$T/synloss-proxy.err" \
    "$NBS_BIN" proxy --name "$NBS_CLIENT_NAME" --listen "127.0.0.1:$pfl" --to "$NBS_SERVER_NAME:$pf" --legacy fallback --json
nbs_wait_listen "$NBS_NS_S" "$pf" 15
nbs_wait_listen "$NBS_NS_C" "$pfl" 15
for i in 1 2; do
    if ((i == 2)); then
        nbs_s nft -f - <<NFT
table inet nbs_synloss {
    set seen4 { type ipv4_addr; flags timeout; timeout 60s; }
    set seen6 { type ipv6_addr; flags timeout; timeout 60s; }
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport $pf tcp flags & (syn | ack) == syn ip saddr != @seen4 update @seen4 { ip saddr } counter drop
        tcp dport $pf tcp flags & (syn | ack) == syn ip6 saddr != @seen6 update @seen6 { ip6 saddr } counter drop
    }
}
NFT
    fi
    rc=0
    nbs_c timeout 30 socat -t 10 - "TCP:127.0.0.1:$pfl" <"$T/in.bin" >"$T/synloss$i.out" || rc=$?
    got=$(sum "$T/synloss$i.out")
    [[ $rc == 0 && $got == "$want" ]] || nbs_fail "socat -> proxy --legacy fallback -> serve --echo (#$i): exit $rc, sha256 $got, want $want"
done
dropped=$(nbs_s nft list table inet nbs_synloss | awk '/counter packets/ { for (i = 1; i < NF; i++) if ($i == "packets") n += $(i + 1) } END { print n + 0 }')
nbs_s nft delete table inet nbs_synloss
sleep 0.3
nbs_sessions=$(json_lines "$T/synloss-proxy.out" "sum(1 for j in lines if j.get('completed') and not j.get('legacy'))")
fell_back=$(grep -c 'does not speak NBS' "$T/synloss-proxy.err" || true)
echo "fallback proxy -> serve --echo, twice, the second's SYNs dropped ($dropped dropped): $nbs_sessions NBS session(s), $fell_back fallback(s)"
((dropped >= 1)) || nbs_fail "no SYN was dropped: the case did not test anything"
((nbs_sessions == 2 && fell_back == 0)) || nbs_fail "a lost SYN made the fallback proxy take an NBS server for a legacy one ($nbs_sessions NBS session(s) of 2, $fell_back fallback(s))"

if ((NBS_FAILS == 0)); then
    echo "PASS legacy-programs: socat, nc, silent nc, curl against NBS listeners; fallback, nbs-only, legacy-only against socat; fallback to NBS through a lost SYN"
    exit 0
fi
for f in "$T"/*.err; do [[ -s $f ]] && { echo "--- tail $f"; tail -n 8 "$f"; }; done
echo "FAIL legacy-programs: $NBS_FAILS failed check(s)"
exit 1

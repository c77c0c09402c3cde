#!/usr/bin/env bash
# `nbs-mobility monitor --json` in the client namespace sees what the path manager must react to, in order:
# its initial dump (the usable addresses already there), nbs1 going down (interface_down, and its addresses
# no longer usable: address_removed), nbs1 coming back (interface_up, address_added), an IPv4 address deleted and
# re-added with the link up, and nothing usable for a scope-link address (like the DNS link's).
# Env: NBS_BIN, NBS_TIMEOUT (s, default 30).
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

nbs_scenario_start --rate 0

if ! "$NBS_BIN" help monitor >/dev/null 2>&1; then
    nbs_log "skip: this nbs-mobility has no 'monitor' command"
    exit "$NBS_SKIP"
fi
mpid="" mrc=0 # set by nbs_bg, nbs_wait_rc
out=$NBS_TMP/monitor
nbs_bg mpid "$NBS_NS_C" "${NBS_TIMEOUT:-30}" "$out" "$out.err" "$NBS_BIN" monitor --json --duration 5
sleep 1
nbs_log "nbs1 down"
nbs_link_down 1 c
sleep 0.4
nbs_log "nbs1 up"
nbs_link_up 1 c
sleep 0.4
nbs_log "198.51.100.1 deleted, then added again"
nbs_addr_del 2 4 c
sleep 0.2
nbs_addr_add 2 4 c
sleep 0.2
nbs_log "203.0.113.99/32 scope link added on nbs2"
nbs_c ip addr add 203.0.113.99/32 dev nbs2 scope link
nbs_wait_rc mrc "$mpid"
echo "--- monitor output (exit $mrc)"
cat "$out"

python3 - "$out" "$mrc" <<'EOF'
import json, sys
path, rc = sys.argv[1], sys.argv[2]
events = []
for line in open(path, encoding="utf-8", errors="replace"):
    line = line.strip()
    if not line:
        continue
    try:
        events.append(json.loads(line))
    except ValueError:
        print("FAIL: monitor printed a line that is not JSON: %r" % line[:200])
        sys.exit(1)

def key(e):
    return (e.get("event"), e.get("interface") if e.get("event", "").startswith("interface") else e.get("address"))

want = [
    ("address_added", "192.0.2.1"),        # initial dump
    ("interface_down", "nbs1"),
    ("address_removed", "192.0.2.1"),
    ("address_removed", "2001:db8:1::1"),
    ("interface_up", "nbs1"),
    ("address_added", "192.0.2.1"),
    ("address_added", "2001:db8:1::1"),
    ("address_removed", "198.51.100.1"),
    ("address_added", "198.51.100.1"),
]
# Events of one step may come in any order: match step by step, each step's set after the previous step's.
steps = [want[0:1], want[1:4], want[4:7], want[7:8], want[8:9]]
errors = []
if rc not in ("0", "124"):
    errors.append("monitor exited %s" % rc)
pos = 0
for step in steps:
    found = []
    for w in step:
        for i in range(pos, len(events)):
            if key(events[i]) == w:
                found.append(i)
                break
        else:
            errors.append("no %s %s after event #%d" % (w[0], w[1], pos))
    if found:
        pos = max(found) + 1
bad = [e for e in events if e.get("address") == "203.0.113.99" and e.get("event") == "address_added" and e.get("usable", True)]
if bad:
    errors.append("a scope-link address was reported usable: %s" % bad[0])
if errors:
    print("FAIL: " + "; ".join(errors))
    sys.exit(1)
print("PASS monitor: %d events, all expected ones in order" % len(events))
EOF

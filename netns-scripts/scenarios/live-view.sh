#!/usr/bin/env bash
# The live view on a pseudo-terminal: `nbs-mobility connect` runs inside tmux (a real pty, 160x40) in the client
# namespace while the client's path-1 link goes down mid-transfer. The screen is captured three times and must show:
#   - during the transfer: one table (its header once: the redraw does not smear), a progress bar towards the
#     byte count, and a row per subflow with addresses, interface and state, with an active and a standby row
#     (IPv4 and IPv6 between the same two interfaces: one carries the data) on nbs1 and on nbs2;
#   - after the link went down: the event "link nbs1 down" above the table, nbs1's rows shown as retired, nbs2's
#     still active;
#   - at the end: 100%, the summary "completed" and exit status 0; no control sequence printed as text.
# `nbs-mobility status`, run from the host (outside the namespace), must show the same session meanwhile.
# Env: NBS_RATE (default 10), NBS_BYTES (default 20 MiB), NBS_TIMEOUT (default 60), NBS_BIN.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((20 * 1024 * 1024))}
export NBS_TIMEOUT=${NBS_TIMEOUT:-60}

nbs_require_cmd tmux "the live view is checked on a tmux pseudo-terminal"
nbs_scenario_start --rate "${NBS_RATE:-10}"

port=$(nbs_port)
spid="" src=0
nbs_serve_bg spid "$port" "$NBS_TMP/xfer" --sink

# A tmux server of our own (its own socket), so nothing else's sessions are touched.
sock="nbs-view-$$-$RANDOM"
control=$NBS_TMP/control
mkdir -m 700 "$control"
nbs_on_exit "tmux -L $sock kill-server 2>/dev/null || true"
tmux -L "$sock" -f /dev/null new-session -d -s view -x 160 -y 40 \
    "ip netns exec $NBS_NS_C env NBS_CONTROL_DIR=$control timeout -k 5 $NBS_TIMEOUT $NBS_BIN connect --name $NBS_CLIENT_NAME $NBS_SERVER_NAME:$port --bytes $bytes; echo EXIT=\$?; sleep $NBS_TIMEOUT"
capture() { tmux -L "$sock" capture-pane -p -t view >"$1"; }

sleep 3
capture "$NBS_TMP/screen-running"
NBS_CONTROL_DIR=$control "$NBS_BIN" status >"$NBS_TMP/status" 2>&1 || true
nbs_log "link nbs1 down"
nbs_link_down 1 c
sleep 2
capture "$NBS_TMP/screen-after-fault"
for ((i = 0; i < NBS_TIMEOUT * 4; i++)); do
    capture "$NBS_TMP/screen-end"
    grep -q '^EXIT=' "$NBS_TMP/screen-end" && break
    sleep 0.25
done
nbs_wait_rc src "$spid"

for f in screen-running status screen-after-fault screen-end; do
    echo "--- $f"
    sed -e '/^$/d' "$NBS_TMP/$f"
done

python3 - "$NBS_TMP" "$bytes" "$src" <<'PY'
import re, sys
tmp, total, server_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
header = "  #  local -> remote"
row = re.compile(r"^\s*(\d+)\s+(\S+) -> (\S+)\s+(\S+)\s+(joining|active|standby|backup|probing|retired)\s")
fails = []

def screen(name):
    text = open("%s/%s" % (tmp, name), encoding="utf-8", errors="replace").read()
    if "\x1b" in text or "[?25" in text or "[J" in text:
        fails.append("%s: a control sequence was printed as text" % name)
    return text

def rows(text):
    return [m.groups() for m in map(row.match, text.splitlines()) if m]

s = screen("screen-running")
if s.count(header) != 1:
    fails.append("running: the table header appears %d times, not once (the redraw smears)" % s.count(header))
if not re.search(r"\[#*\.*\]  \d+\.\d MiB/%.1f MiB  \d+%%" % (total / 1048576), s):
    fails.append("running: no progress bar towards %d bytes" % total)
r = rows(s)
for dev in ("nbs1", "nbs2"):
    if not any(x[3] == dev and x[4] == "active" for x in r):
        fails.append("running: no active subflow row on %s (rows: %s)" % (dev, r))
    # IPv4 and IPv6 over the same two interfaces: one carries the data, the other stands by.
    if not any(x[3] == dev and x[4] == "standby" for x in r):
        fails.append("running: no standby subflow row on %s (rows: %s)" % (dev, r))

s = screen("screen-after-fault")
if "link nbs1 down" not in s:
    fails.append("after the fault: no 'link nbs1 down' event on screen")
r = rows(s)
if not any(x[3] == "nbs1" and x[4] == "retired" for x in r):
    fails.append("after the fault: no retired row on nbs1 (rows: %s)" % r)
if any(x[3] == "nbs1" and x[4] in ("active", "standby") for x in r):
    fails.append("after the fault: a row on nbs1 is still active or standing by")
if not any(x[3] == "nbs2" and x[4] == "active" for x in r):
    fails.append("after the fault: no active row on nbs2")

s = screen("screen-end")
if "EXIT=0" not in s:
    fails.append("end: the client did not exit 0 (%s)" % (re.findall(r"EXIT=\d+", s) or "no exit"))
if "100%" not in s or ": completed" not in s:
    fails.append("end: no 100% progress or no 'completed' summary")

st = open("%s/status" % tmp, encoding="utf-8", errors="replace").read()
if "connect" not in st or "client.nbs.test -> server.nbs.test" not in st or not any(x[4] == "active" for x in rows(st.replace("    ", "", 1))):
    fails.append("status from the host did not show the running session with an active subflow")
if server_rc != 0:
    fails.append("server exit %d" % server_rc)
print("FAIL live-view: " + "; ".join(fails) if fails else "PASS live-view: table, progress, events and retired rows as expected")
sys.exit(1 if fails else 0)
PY

#!/usr/bin/env bash
# Path MTU discovery on UDP subflows (RFC 8899): the server's end of path 1 has an MTU of 1,450, so the
# client's probes of 1,472-byte (IPv4) and 1,452-byte (IPv6) datagrams die silently there (a veth drops
# what its receiver's MTU cannot hold, as a blackholing tunnel would; no ICMP), while path 2 carries 1,500.
# Each end must settle on the largest size its path carries: 1,400 bytes over path 1, 1,472 and 1,452 over
# path 2, both ways, and the bytes must arrive intact.
# Env: NBS_RATE (tbf Mbit/s per path, default 10), NBS_BYTES (default 4 MiB), NBS_BIN.
# transports: udp
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

bytes=${NBS_BYTES:-$((4 * 1024 * 1024))}
[[ ${NBS_TRANSPORT:-tcp} == udp ]] || { echo "SKIP path-mtu: UDP subflows only (NBS_TRANSPORT=udp)"; exit 0; }

nbs_scenario_start --rate "${NBS_RATE:-10}"
ip -n "$NBS_NS_S" link set "$NBS_IF_1" mtu 1450

out=$NBS_TMP/xfer
nbs_transfer "$out" "$bytes" --policy aggregate

ok=1
nbs_check "$out" "$bytes" "$NBS_CRC" "$NBS_SRC" || ok=0
python3 - "$out.client" "$out.server" <<'PY' || ok=0
import json, sys

# path 1 is 192.0.2.0/24 and 2001:db8:1::/64, path 2 198.51.100.0/24 and 2001:db8:2::/64 (lib.sh)
expected = {"192.0.2.": 1400, "2001:db8:1:": 1400, "198.51.100.": 1472, "2001:db8:2:": 1452}
failures = 0
for path in sys.argv[1:]:
    report = json.loads(open(path).read().strip().splitlines()[-1])
    for s in report.get("subflows", []):
        want = next(v for k, v in expected.items() if s["local"].startswith(k))
        got = s.get("datagram_size")
        mark = "ok" if got == want else "FAIL"
        failures += got != want
        print(f"{mark}: {path.rsplit('.', 1)[-1]} {s['local']} -> {s['remote']}: datagrams of {got} bytes (want {want})")
sys.exit(1 if failures else 0)
PY
if ((ok)); then
    echo "PASS path-mtu: both ends settled on 1400-byte datagrams over path 1 (MTU 1450), 1472/1452 over path 2"
else
    echo "FAIL path-mtu"
    exit 1
fi

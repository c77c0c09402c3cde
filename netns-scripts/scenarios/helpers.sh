#!/usr/bin/env bash
# The shell helpers the other scenarios rely on, checked without a topology: nbs_port must never give one
# run the same port twice (two listeners of legacy-programs once got the same one, and its recorder could
# not bind) and must stay out of the kernel's ephemeral range.
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/../lib.sh"

nbs_tmpdir
read -r eph_low eph_high </proc/sys/net/ipv4/ip_local_port_range
picks=500
declare -A seen=()
for ((i = 0; i < picks; i++)); do
    port=$(nbs_port)
    [[ -z ${seen[$port]:-} ]] || nbs_fail "nbs_port gave $port twice in $((i + 1)) picks"
    seen[$port]=1
    ((port >= 1024 && port < 65536)) || nbs_fail "nbs_port gave $port, not a port"
    ((port < eph_low || port > eph_high)) || nbs_fail "nbs_port gave $port, inside the ephemeral range $eph_low-$eph_high"
    ((NBS_FAILS == 0)) || break
done
if ((NBS_FAILS == 0)); then
    echo "PASS helpers: nbs_port gave $picks distinct ports, none in $eph_low-$eph_high"
    exit 0
fi
echo "FAIL helpers: $NBS_FAILS failed check(s)"
exit 1

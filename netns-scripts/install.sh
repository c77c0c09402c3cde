#!/usr/bin/env bash
# Install what the NBS build, tests and namespace scenarios need on a fresh Debian machine. Idempotent and
# non-interactive: apt is not touched at all when everything is already installed. Needs root (or sudo).
# Swift itself is not installed here (it comes with the machine, /opt/swift).
set -euo pipefail

PACKAGES=(libmnl-dev iproute2 nftables dnsmasq-base socat tmux python3 gnuplot-nox curl netcat-openbsd conntrack)
export DEBIAN_FRONTEND=noninteractive

SUDO=()
if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null || { echo "install.sh: needs root (or sudo)" >&2; exit 1; }
    SUDO=(sudo -n)
fi

installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }
has_candidate() {
    local c
    c=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [[ -n $c && $c != "(none)" ]]
}

missing=()
for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done

if ((${#missing[@]} > 0)); then
    echo "install.sh: installing ${missing[*]}"
    "${SUDO[@]}" apt-get update -qq
    wanted=()
    for p in "${missing[@]}"; do
        if has_candidate "$p"; then wanted+=("$p"); else echo "install.sh: no package '$p' here, skipping it" >&2; fi
    done
    if ((${#wanted[@]} > 0)); then
        "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${wanted[@]}" >/dev/null
    fi
else
    echo "install.sh: all packages present (${PACKAGES[*]})"
fi

# Kernel features the scenarios rely on; report, do not fail (the scenarios skip or fail with a reason).
for m in veth sch_tbf; do modprobe -q "$m" 2>/dev/null || true; done
if [[ $(sysctl -n net.mptcp.enabled 2>/dev/null || echo 0) != 1 ]]; then
    echo "install.sh: note: kernel MPTCP is not enabled (net.mptcp.enabled), the MPTCP reference will fail" >&2
fi
command -v swift >/dev/null || echo "install.sh: note: swift is not on PATH" >&2
exit 0

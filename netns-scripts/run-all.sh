#!/usr/bin/env bash
# Run every netns-scripts/scenarios/*.sh (or the ones named as arguments), each bounded in time, and print
# one line per scenario and a last line "N passed, N failed" (", N skipped" when any were skipped).
# A scenario whose header has a line "# transports: tcp udp" runs once per transport (NBS_TRANSPORT set, and
# "/udp" after its name); NBS_TRANSPORTS (e.g. "tcp") limits the transports run.
# A scenario passes with exit 0 and is skipped with exit 77. Without root or a working `ip netns`, all are
# skipped. Env: NBS_BIN, NBS_SCENARIO_TIMEOUT (s per scenario, default 300), NBS_RUN_ALL_LOGS (keep logs there),
# and whatever the scenarios read (e.g. NBS_SRCROUTE=1: per-source policy routing in every topology).
set -euo pipefail
# shellcheck source=netns-scripts/lib.sh
source "$(dirname "$0")/lib.sh"

tmo=${NBS_SCENARIO_TIMEOUT:-300}
if (($#)); then
    scenarios=("$@")
else
    shopt -s nullglob
    scenarios=("$NBS_LIB_DIR"/scenarios/*.sh)
fi

logs=${NBS_RUN_ALL_LOGS:-}
if [[ -z $logs ]]; then
    logs=$(mktemp -d "${TMPDIR:-/tmp}/nbs-run-all.XXXXXX")
    trap 'rm -rf "$logs"' EXIT
fi
mkdir -p "$logs"

passed=0 failed=0 skipped=0
if ! nbs_can_netns; then
    echo "skipping ${#scenarios[@]} scenario(s): needs root and a working 'ip netns'"
    skipped=${#scenarios[@]}
    scenarios=()
else
    nbs_gc_stale
fi

runs=()
for s in "${scenarios[@]}"; do
    declared=$(sed -n 's/^# transports: //p' "$s" | head -n1)
    for transport in ${declared:-tcp}; do
        [[ " ${NBS_TRANSPORTS:-tcp udp} " == *" $transport "* ]] && runs+=("$s:$transport")
    done
done

for run in "${runs[@]}"; do
    s=${run%:*}
    transport=${run##*:}
    name=$(basename "$s" .sh)
    label=$name
    [[ $transport != tcp ]] && label=$name/$transport
    log=$logs/${label//\//-}.log
    start=$SECONDS
    rc=0
    NBS_TRANSPORT=$transport timeout -k 10 "$tmo" bash "$s" >"$log" 2>&1 </dev/null || rc=$?
    took=$((SECONDS - start))
    nbs_gc_stale 2>>"$log" # only matters when a scenario had to be killed
    case $rc in
        0)
            passed=$((passed + 1))
            # The scenario's own verdict line ("PASS NAME: max_stall_ms ..."), when it prints one.
            detail=$(grep -m1 "^PASS $name: " "$log" | sed "s/^PASS $name: //" || true)
            echo "PASS $label (${took}s)${detail:+: $detail}"
            ;;
        77) skipped=$((skipped + 1)); echo "SKIP $label: $(grep -m1 -o 'skip: .*' "$log" || echo 'skipped')" ;;
        *)
            failed=$((failed + 1))
            reason=$(grep -m1 '^FAIL: ' "$log" || true)
            ((rc == 124 || rc == 137)) && reason="timed out after ${tmo}s"
            echo "FAIL $label (exit $rc, ${took}s)${reason:+: $reason}"
            echo "---- last lines of $label.log"
            tail -n 40 "$log" | sed 's/^/    /'
            ;;
    esac
done

if ((skipped > 0)); then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
((failed == 0))

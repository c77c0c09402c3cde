#!/usr/bin/env bash
# The repository's test command: build once (with tests), run the Swift tests, then the namespace
# scenarios against the freshly built CLI. Exits non-zero when the build, the Swift tests or any scenario fails.
# The last line printed is run-all.sh's "N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

export NBS_BIN=${NBS_BIN:-.build/debug/nbs-mobility}
# Inside test-all a missing binary is a failure, not a skip.
export NBS_REQUIRE_BIN=${NBS_REQUIRE_BIN:-1}

echo "== swift build --build-tests"
swift build --build-tests

# Processes the Swift tests start (CLI servers waiting for a session) die with their test, but not when
# the test process itself dies (a crash): they would outlive the run, holding ports. They inherit this
# tag in their environment, which is how they are found afterwards; nothing else carries it.
test_tag="nbs-test-all-$$-$RANDOM"
reap_tagged() {
    local environ pid reaped=()
    for environ in /proc/[0-9]*/environ; do
        pid=${environ#/proc/}
        pid=${pid%/environ}
        grep -qsxzF "NBS_TEST_RUN_TAG=$test_tag" "$environ" && reaped+=("$pid")
    done
    if ((${#reaped[@]} > 0)); then
        echo "test-all: killing ${#reaped[@]} process(es) the Swift tests left running: ${reaped[*]}"
        kill -KILL "${reaped[@]}" 2>/dev/null || true
    fi
    # The netlink tests' namespaces are named nltest-PID-...: a test process that died leaves its own
    # behind. Those of a live process (a second run) stay.
    local ns owner
    for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^nltest-[0-9]+-/ { print $1 }'); do
        owner=${ns#nltest-}
        owner=${owner%%-*}
        [[ -d /proc/$owner ]] && continue
        ip netns delete "$ns" 2>/dev/null && echo "test-all: removed namespace $ns, left by test process $owner, which is gone"
    done
    return 0
}

# The protocol core's tests are pure computation (random-fault simulations, half a minute of both
# cores in a debug build): run beside the socket tests they held every thread of Swift's pool, and
# tests waiting on timers and sockets missed their deadlines. So they run first, alone.
rc=0
echo "== swift test --skip-build --filter '^NBSProtocolTests\.'"
NBS_TEST_RUN_TAG=$test_tag swift test --skip-build --filter '^NBSProtocolTests\.' || rc=$?
echo "== swift test --skip-build --skip '^NBSProtocolTests\.'"
NBS_TEST_RUN_TAG=$test_tag swift test --skip-build --skip '^NBSProtocolTests\.' || rc=$?
((rc == 0)) || echo "test-all: swift test failed (exit $rc)"
reap_tagged

echo "== netns scenarios (NBS_BIN=$NBS_BIN)"
bash netns-scripts/run-all.sh || rc=1
exit "$rc"

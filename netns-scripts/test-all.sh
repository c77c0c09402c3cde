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

rc=0
echo "== swift test --skip-build"
swift test --skip-build || rc=$?
((rc == 0)) || echo "test-all: swift test failed (exit $rc)"

echo "== netns scenarios (NBS_BIN=$NBS_BIN)"
bash netns-scripts/run-all.sh || rc=1
exit "$rc"

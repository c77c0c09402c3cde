#!/usr/bin/env bash
# One command from a fresh machine to a running demo: install the packages, build, run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash netns-scripts/install.sh
swift build
exec bash netns-scripts/demo.sh "$@"

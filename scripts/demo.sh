#!/usr/bin/env bash
# Set up (see setup.sh) and run the demo: node, worker and a receiving PACS stand-in on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/pleura demo "$@"

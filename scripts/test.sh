#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite. Extra arguments go to pytest.
#   ./scripts/test.sh            the suite (the container image's tests left out)
#   ./scripts/test.sh --image    build the cpu image (docker/build-local.sh, as root) and run its tests
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ "${1:-}" = --image ]; then
    shift
    docker/build-local.sh cpu
    exec .venv/bin/python -m pytest -ra -m image "$@"
fi
exec .venv/bin/python -m pytest -ra --durations=30 "$@"

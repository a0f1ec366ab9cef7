#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite. Extra arguments go to pytest.
#   ./scripts/test.sh            the suite (the container image's tests left out), in PLEURA_TEST_PROCESSES (2) processes
#   ./scripts/test.sh --image    build the cpu image (docker/build-local.sh, as root) and run its tests
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
if [ "${1:-}" = --image ]; then
    shift
    docker/build-local.sh cpu
    exec .venv/bin/python -m pytest -ra -m image "$@"
fi
# Two test processes (pytest-xdist, a file at a time each): most tests wait on servers they started.
exec .venv/bin/python -m pytest -ra --durations=30 -n "${PLEURA_TEST_PROCESSES:-2}" --dist loadfile "$@"

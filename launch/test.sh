#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole suite.
# Real-data tests use ../shared/data/lgg-dev.tar.xz (or $BRAINSEG_LGG_ARCHIVE) and skip without it.
# The report test drives the system's Chromium (never a browser build downloaded by a tool):
# as root with apt, Debian's package is installed here, best effort and quietly; without it
# that test is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1; then
    if (timeout 300 apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq \
                --no-install-recommends chromium) >/dev/null 2>&1; then
        echo "test: installed chromium (Debian package) for the report test"
    else
        echo "test: chromium could not be installed (apt unavailable); the browser test" \
             "will be skipped" >&2
    fi
fi
# Two pytest workers (pytest-xdist), one test file each at a time, so a file's module-scoped
# fixtures are built once: on 2 cores the suite took 414 s against about 700 s in one process.
# Files go out in collection order, which tests/conftest.py starts with the longest ones
# (xdist's default would order them by their number of tests).
# OpenMP threads sleep rather than spin when the two workers' torch threads share the cores.
# `bash launch/test.sh -n 0` runs it in one process.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"

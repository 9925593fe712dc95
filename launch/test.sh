#!/usr/bin/env bash
# The README's test command: set up the environment, then run the whole suite.
# Real-data tests use ../shared/data/lgg-dev.tar.xz (or $BRAINSEG_LGG_ARCHIVE) and skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# The README's main job: set up the environment, then train on a generated synthetic dataset
# (configs/demo.yaml; a few minutes on 2 CPU cores). Extra arguments go to `brainseg train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
exec .venv/bin/brainseg train --config configs/demo.yaml "$@"

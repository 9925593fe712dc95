#!/usr/bin/env bash
# Create .venv and install brainseg-dist with its test tools. Idempotent and quick when done.
# torch==2.13.0 is installed first and explicitly: an open "torch" requirement would pull the
# newest CUDA build (gigabytes); with 2.13.0 present, the package's range is already met.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

pip_install() {
    local log
    log=$(mktemp)
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        echo "setup: pip install $* failed" >&2
        exit 1
    fi
    grep -v "^WARNING: Location" "$log" || true  # this machine's local index is noisy
    rm -f "$log"
}

pip_install "torch==2.13.0"
pip_install -e ".[dev]"
# pip byte-compiles what it installs, but not an editable project's own sources; where
# PYTHONDONTWRITEBYTECODE is set (as on this project's machines) every process would compile
# them again: 0.36 s of CPU per process that imports the package, about 100 per test run.
.venv/bin/python -m compileall -q brainseg_dist benchmarks >/dev/null
.venv/bin/python -c "import torch, brainseg_dist; assert torch.__version__.startswith('2.13.0'), torch.__version__"

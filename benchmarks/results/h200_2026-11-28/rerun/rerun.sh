#!/usr/bin/env bash
# Second device call, 2026-11-28: train_fast after the blur-matrix fix, and the InstanceNorm CV.
set -uo pipefail
export PYTHONUNBUFFERED=1 BRAINSEG_NO_PROGRESS=1
W=$(mktemp -d); export BRAINSEG_CACHE_DIR=$W/cache
L=$OUT/rerun.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$L" 2>&1
python3 -m pip install -q --no-index --no-deps --target "$W/site" .whl/*.whl >>"$L" 2>&1
export PYTHONPATH=$PWD:$W/site
t0=$(date +%s)
timeout -k 5 100 python3 benchmarks/gpu_checks.py train --config configs/lgg_unet128.yaml \
  --epochs 3 --synthetic-patients 60 --set train.compile=true \
  --set train.compile_mode=reduce-overhead --work "$W/train_fast" \
  --json "$OUT/train_fast.json" >>"$L" 2>&1
echo "train_fast: exit status $? after $(( $(date +%s) - t0 )) s" | tee -a "$L"
t0=$(date +%s)
timeout -k 5 150 python3 benchmarks/gpu_cv.py --archive .data/lgg-dev.tar.xz --jobs 5 \
  --epochs 50 --deadline 140 --recipe instance_norm --json "$OUT/cv_instance_norm.json" >>"$L" 2>&1
echo "cv instance_norm: exit status $? after $(( $(date +%s) - t0 )) s" | tee -a "$L"
grep -E "img/s|epoch|warning|Error|gpu_cv" "$L" | tail -30

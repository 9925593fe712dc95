#!/usr/bin/env bash
# The README's main job: set up the environment, train on a generated synthetic dataset
# (configs/demo.yaml; a few minutes on 2 CPU cores), then evaluate the held-out test patients
# and write report.html. Extra arguments go to `brainseg train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
out=runs/demo
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do  # follow --output-dir if one is given
    case "${args[i]}" in
        --output-dir) out="${args[i + 1]}" ;;
        --output-dir=*) out="${args[i]#--output-dir=}" ;;
    esac
done
.venv/bin/brainseg train --config configs/demo.yaml "$@"
.venv/bin/brainseg evaluate "$out"
cat <<NEXT

The report: $out/eval_test/report.html (open it in a browser; it needs no network).
Next steps (after: source .venv/bin/activate):
  brainseg evaluate $out --tta --lcc             # flip TTA + largest component as the headline
  brainseg export $out                           # model.ts, model.pt2, model.onnx, metadata.json
  brainseg predict $out/model.ts NEW_SCANS/ out/ # tif slices, folders, or FLAIR .nii.gz volumes
  brainseg predict $out/model.onnx flair.nii.gz out/   # onnxruntime instead of torch
  brainseg score out/ LABELS/                    # those masks against your ground truth
  tensorboard --logdir runs/                     # training curves and validation overlays
NEXT

#!/usr/bin/env bash
# The whole GPU verification of the fast path in one prepared run: under 8 minutes on one
# H100 or H200, with no network; with the real patients carried, a cross-validation of the GPU
# recipe fills the rest of one 600 s device call. --cpu (or GPU_CHECK_CPU=1) runs tiny versions
# of every step on the CPU in a few minutes; tests/test_benchmarks.py runs that mode, so the
# script cannot rot.
#
#   mkdir -p .whl && cp ../shared/device-wheels/*.whl .whl/   # beforehand: .whl/ is ignored
#   mkdir -p .data && cp ../shared/data/lgg-dev.tar.xz .data/  # for the cv step: ignored too
#   bash benchmarks/gpu_check.sh           # results in $OUT, else runs/gpu_check
#   bash benchmarks/gpu_check.sh --cpu
#   bash benchmarks/gpu_check.sh --overwrite   # replace an earlier run's results
#   GPU_CHECK_ONLY="train_fast step_ops" bash benchmarks/gpu_check.sh   # rerun some steps
# (device tool: one call, timeout 600, carry [".whl", ".data"]: about 62 MiB of its 64.)
#
# Steps, in order of priority, each under its own time limit and all under one budget
# (GPU_CHECK_BUDGET, 580 s on a GPU: a step gets the lesser of its limit and what is left, and
# is skipped with under 10 s left), so a run fits one 600 s call of the device tool (a step
# that ignores SIGTERM at its limit is killed 10 s later). Exit status and seconds of each go
# to gpu_check.json. GPU_CHECK_ONLY (names, space- or comma-separated) runs only those steps
# (and kornia), for a second call that reruns what the first could not finish. The
# 2026-11-28 H200 runs took 5, 34-38, 25, 91-110, 32-37, 80 and 47 s for kornia, checks, pytest,
# throughput, train, train_fast and step_ops; the cv step's recipes 94-138 s each
# (benchmarks/results/h200_2026-11-28 and h200_2026-11-28b):
#   kornia      installed from .whl/ (pip --no-index --no-deps, into a scratch directory) when
#               it is missing; the project runs from source (PYTHONPATH): nothing else is
#               installed and nothing is downloaded or copied at run time
#   checks      benchmarks/gpu_checks.py: bf16 activations under autocast, channels-last
#               convolution inputs after the augmentation, Kornia on the device, batches from
#               slices held on the device, no host sync inside a step
#   pytest      the gpu-marked tests (the same checks under pytest), when pytest is installed
#   throughput  the full benchmarks/throughput.py --json: the baseline at the dataset
#               author's 4 loader workers and at more, every ablation, compiled training
#   train       3 epochs of configs/lgg_unet128.yaml (one-grid augmentation) on a synthetic
#               set: images/s, peak memory
#   train_fast  the same with train.compile (mode reduce-overhead: the model and the
#               augmentation compiled, as CUDA graphs; GPU only)
#   cv          benchmarks/gpu_cv.py, when .data/lgg-dev.tar.xz was carried: 5-fold CV over the
#               20 real patients of gpu_cv.py's recipes GPU_CHECK_CV_RECIPES (default
#               "compiled": configs/lgg_unet128.yaml with train.compile, to pair with the
#               eager one that results/h200_2026-11-28b/cv.json holds at the same seed), each
#               as brainseg cv --jobs 5 (the folds share the GPU) at 50 epochs, with training
#               seed GPU_CHECK_CV_SEED (default 1), in what is left of the budget (at most
#               240 s; two recipes need a second call)
#   step_ops    benchmarks/step_ops.py: host calls per eager step of the GPU config, by phase,
#               with Adam's kernels (foreach, fused), the geometry, the precision and the norm
#               (batch, instance, group) toggled; each variant's step time, and its GPU kernel
#               time and launches (torch.profiler); each variant is written as it finishes
#   summary     gpu_check.json: the issue's targets against the results
# Files in the output directory: gpu_check.json, gpu_check.log, checks.json, throughput.json,
# train.json, train_fast.json, step_ops.json, cv.json (scratch data, runs and caches stay in a
# temporary directory).
# They are written into OUT/partial/ and moved up when the run ends, so a killed run leaves its
# partial results there and never mixes them with an earlier run's; earlier results need
# --overwrite.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=gpu
[[ "${GPU_CHECK_CPU:-0}" == 1 ]] && MODE=cpu
OVERWRITE=0
for arg in "$@"; do
    case $arg in
        --cpu) MODE=cpu ;;
        --overwrite) OVERWRITE=1 ;;
        *) echo "gpu_check: unknown argument '$arg' (expected --cpu or --overwrite)" >&2; exit 2 ;;
    esac
done
RESULTS=(gpu_check.json gpu_check.log checks.json throughput.json train.json train_fast.json
         step_ops.json cv.json)
STEP_NAMES=" kornia checks pytest throughput train train_fast cv step_ops "
ONLY=${GPU_CHECK_ONLY:-}
ONLY=" ${ONLY//,/ } "
for name in $ONLY; do
    if [[ $STEP_NAMES != *" $name "* ]]; then
        echo "gpu_check: GPU_CHECK_ONLY: unknown step '$name' (steps:$STEP_NAMES)" >&2
        exit 2
    fi
done
FINAL_DIR=${OUT:-runs/gpu_check}
mkdir -p "$FINAL_DIR" || exit 2
FINAL_DIR=$(cd "$FINAL_DIR" && pwd)
if [[ $OVERWRITE == 0 ]]; then
    for f in "${RESULTS[@]}" partial; do
        if [[ -e $FINAL_DIR/$f ]]; then
            echo "gpu_check: $FINAL_DIR/$f is left by an earlier run: pass --overwrite to" \
                "replace it, or set OUT to another directory" >&2
            exit 2
        fi
    done
fi
OUT_DIR=$FINAL_DIR/partial
rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR" || exit 2
LOG=$OUT_DIR/gpu_check.log
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STEPS=$WORK/steps.txt
: >"$LOG"
: >"$STEPS"

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PY=$candidate
            break
        fi
    done
fi
[[ -n "$PY" ]] || { echo "gpu_check: no python with torch found (set PYTHON)" >&2; exit 1; }
export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
export BRAINSEG_NO_PROGRESS=1 BRAINSEG_CACHE_DIR=$WORK/cache

log() { echo "gpu_check: $*" | tee -a "$LOG"; }
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-$([[ $MODE == gpu ]] && echo 580 || echo 1200)}

# Seconds left of the budget.
left_s() { echo $(( BUDGET - $(date +%s) + START - 5 )); }

# step NAME LIMIT_S COMMAND...: run it under a time limit (the lesser of LIMIT_S and what is
# left of the budget), log its output, record the result.
step() {
    local name=$1 limit=$2 t0 rc ms left
    shift 2
    if [[ -n ${ONLY// /} && $ONLY != *" $name "* && $name != kornia ]]; then
        log "$name: not selected (GPU_CHECK_ONLY)"
        printf '%s unselected 0\n' "$name" >>"$STEPS"
        return 0
    fi
    left=$(left_s)
    if (( left < 10 )); then
        log "$name: skipped, ${left} s of the ${BUDGET} s budget left"
        printf '%s skipped 0\n' "$name" >>"$STEPS"
        return 1
    fi
    (( limit > left )) && limit=$left
    log "$name (limit ${limit} s): $*"
    t0=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    printf '%s %d %d.%03d\n' "$name" "$rc" $((ms / 1000)) $((ms % 1000)) >>"$STEPS"
    log "$name: exit status $rc after $((ms / 1000)) s"
    return $rc
}

install_kornia() {
    # One interpreter start (about 4 s on a small CPU: kornia imports torch).
    "$PY" -c "import kornia; print('kornia', kornia.__version__, 'already installed')" \
        2>/dev/null && return 0
    compgen -G ".whl/*.whl" >/dev/null || {
        echo "no wheels in .whl/: run 'mkdir -p .whl && cp ../shared/device-wheels/*.whl .whl/'"
        return 1
    }
    "$PY" -m pip install --no-index --no-deps --quiet --target "$WORK/site" .whl/*.whl &&
        "$PY" -c "import kornia; print('kornia', kornia.__version__, 'from', kornia.__file__)"
}

FAILED=0
log "mode $MODE, python $("$PY" -c 'import sys; print(sys.version.split()[0])'), torch" \
    "$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'), output $FINAL_DIR"
command -v nvidia-smi >/dev/null && nvidia-smi >>"$LOG" 2>&1
export PY WORK
step kornia 20 bash -c "$(declare -f install_kornia); install_kornia" || FAILED=1
CORES=$(nproc)
if [[ $MODE == gpu ]]; then
    step checks 60 "$PY" benchmarks/gpu_checks.py checks --device cuda --work "$WORK/checks" \
        --json "$OUT_DIR/checks.json" || FAILED=1
    if "$PY" -c "import pytest" 2>/dev/null; then
        step pytest 50 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py ||
            FAILED=1
    else
        log "pytest: not installed here; the checks step ran the same checks"
    fi
    # Triton kernels compile in parallel worker processes (throughput.py defaults to one): up
    # to 8 for one compiling process, a fifth of the cores each for the cv step's five folds.
    COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( CORES < 8 ? CORES : 8 ))}
    CV_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(( CORES / 5 > 1 ? CORES / 5 : 1 ))}
    TORCHINDUCTOR_COMPILE_THREADS=$COMPILE_THREADS \
        step throughput 230 "$PY" benchmarks/throughput.py --device cuda --workers 4 \
        --baseline-workers "8,$CORES" --compile-budget 60 --compile-modes reduce-overhead \
        --json "$OUT_DIR/throughput.json" || FAILED=1
    step train 50 "$PY" benchmarks/gpu_checks.py train --config configs/lgg_unet128.yaml \
        --epochs 3 --synthetic-patients 60 --work "$WORK/train" --json "$OUT_DIR/train.json" ||
        FAILED=1
    # The same run compiled (off by default): the same training data, in CUDA graphs. Two
    # compiles (augmentation, then the model's forward and backward) precede the first step.
    TORCHINDUCTOR_COMPILE_THREADS=$COMPILE_THREADS \
        step train_fast 150 "$PY" benchmarks/gpu_checks.py train \
        --config configs/lgg_unet128.yaml --epochs 3 --synthetic-patients 60 \
        --set train.compile=true --set train.compile_mode=reduce-overhead \
        --work "$WORK/train_fast" --json "$OUT_DIR/train_fast.json" || FAILED=1
    if [[ -f .data/lgg-dev.tar.xz ]]; then
        # gpu_cv.py stops its recipe at its deadline and keeps what finished.
        CV_DEADLINE=$(( $(left_s) - 15 ))
        (( CV_DEADLINE > 240 )) && CV_DEADLINE=240
        CV_RECIPES=()
        for name in ${GPU_CHECK_CV_RECIPES:-compiled}; do
            CV_RECIPES+=(--recipe "$name")
        done
        TORCHINDUCTOR_COMPILE_THREADS=$CV_THREADS \
            step cv 250 "$PY" benchmarks/gpu_cv.py --archive .data/lgg-dev.tar.xz --jobs 5 \
            --epochs 50 "${CV_RECIPES[@]}" \
            --seed "${GPU_CHECK_CV_SEED:-1}" --deadline "$CV_DEADLINE" \
            --json "$OUT_DIR/cv.json" || FAILED=1
    else
        log "cv: skipped, no .data/lgg-dev.tar.xz (copy it there and carry .data)"
    fi
    # Host calls per eager step, by phase, with the optimizer and geometry variants.
    step step_ops 90 "$PY" benchmarks/step_ops.py configs/lgg_unet128.yaml --profile 5 \
        --json "$OUT_DIR/step_ops.json" || FAILED=1
else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
    step checks 120 "$PY" benchmarks/gpu_checks.py checks --device cpu --work "$WORK/checks" \
        --json "$OUT_DIR/checks.json" || FAILED=1
    step throughput 120 "$PY" benchmarks/throughput.py --tiny --device cpu \
        --no-compile --baseline-workers 1 --json "$OUT_DIR/throughput.json" || FAILED=1
    step train 120 "$PY" benchmarks/gpu_checks.py train --config configs/lgg_unet128.yaml \
        --epochs 1 --synthetic-patients 4 --set data.image_size=32 --set model.base_width=4 \
        --set train.batch_size=8 --set train.cpu=true --work "$WORK/train" \
        --json "$OUT_DIR/train.json" || FAILED=1
    step step_ops 120 "$PY" benchmarks/step_ops.py configs/lgg_unet128.yaml --profile 2 \
        --set data.image_size=32 --set model.base_width=4 --set train.batch_size=8 \
        --set train.cpu=true --json "$OUT_DIR/step_ops.json" || FAILED=1
    # The folds train in the call's own process (--jobs 1): concurrent jobs would add an
    # interpreter start each, and tests/test_cv.py covers that path.
    step cv 150 "$PY" benchmarks/gpu_cv.py --synthetic 4 --folds 2 --jobs 1 --tiny \
        --recipe lgg_unet128 --recipe instance_norm --seed "${GPU_CHECK_CV_SEED:-1}" \
        --deadline 140 --json "$OUT_DIR/cv.json" || FAILED=1
fi
"$PY" benchmarks/gpu_checks.py summary --out "$OUT_DIR" --steps "$STEPS" >>"$LOG" 2>&1 ||
    FAILED=1
log "done: $FINAL_DIR/gpu_check.json ($([[ $FAILED == 0 ]] && echo 'every step ran' ||
    echo 'some step FAILED: see the log'))"
# Publish: every result of this run replaces its namesake; an earlier run's file that this run
# did not write goes, so the directory never mixes two runs.
for f in "${RESULTS[@]}"; do
    if [[ -e $OUT_DIR/$f ]]; then
        mv -f "$OUT_DIR/$f" "$FINAL_DIR/$f"
    else
        rm -f "$FINAL_DIR/$f"
    fi
done
rmdir "$OUT_DIR"
exit $FAILED

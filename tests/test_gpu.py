"""The GPU fast path in effect on CUDA (``gpu`` marker; skipped without a GPU).

The checks are the functions of ``benchmarks/gpu_checks.py`` (which ``benchmarks/gpu_check.sh``
also runs without pytest); each asserts what it needs and returns what it saw. Their CPU
stand-ins run in CI through ``gpu_check.sh --cpu`` (``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_checks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """One tiny CUDA trainer (bf16, channels-last, slices on the device) for every check."""
    from accelerate.state import AcceleratorState

    # Tests before this one may have set up Accelerate otherwise; one setting per process.
    AcceleratorState._reset_state(True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAINSEG_NO_PROGRESS", "1")
        mp.setenv("BRAINSEG_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return gpu_checks.tiny_trainer(tmp_path_factory.mktemp("gpu_run"), "cuda")


def test_activations_are_bf16_under_autocast(trainer):
    seen = gpu_checks.check_bf16_autocast(trainer)
    assert seen["conv_output_dtypes"]["torch.bfloat16"] > 0


def test_convolutions_get_channels_last_inputs_after_augmentation(trainer):
    seen = gpu_checks.check_channels_last(trainer)
    assert seen["convolutions"]["input channels-last"] > 0


def test_kornia_runs_on_cuda_tensors(trainer):
    seen = gpu_checks.check_kornia_on_device(trainer)
    assert all(op["output"].startswith("cuda") for op in seen["ops"].values())


def test_batches_come_from_slices_held_on_the_gpu(trainer):
    seen = gpu_checks.check_device_batches(trainer)
    assert seen["device"].startswith("cuda")


def test_no_host_sync_inside_a_step(trainer):
    seen = gpu_checks.check_no_host_sync(trainer)
    assert seen["how"].startswith("torch.cuda.set_sync_debug_mode")


def test_no_host_sync_inside_a_step_with_the_one_grid_geometry(trainer):
    seen = gpu_checks.check_no_host_sync_fused(trainer)
    assert seen["augment"] == "fused"
    assert seen["how"].startswith("torch.cuda.set_sync_debug_mode")


def test_compiled_augmentation_draws_anew_under_cuda_graphs(trainer):
    seen = gpu_checks.check_compiled_augment_draws(trainer)
    assert seen["compiled"] == "reduce-overhead"

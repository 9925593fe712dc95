"""What a training run needs before its first epoch: the accelerator and seeds, the dataset root
(generated when synthetic), the patient split, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.optim.lr_scheduler import LambdaLR

from brainseg_dist import rundir
from brainseg_dist.config import Config
from brainseg_dist.console import warn
from brainseg_dist.data import SliceData
from brainseg_dist.data.split import load_split, make_split, patient_burden
from brainseg_dist.data.synth import write_synthetic_dataset
from brainseg_dist.errors import BrainsegError
from brainseg_dist.io import atomic_write_text, remove_temporaries


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU has AMX (Intel Sapphire Rapids and later): bf16 matrix units that make
    bf16 autocast about 3x faster than fp32 for this U-Net (benchmarks/README.md). Without
    them, bf16 is converted around fp32 arithmetic and autocast slows training."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def resolve_mixed_precision(setting: str, device_type: str) -> str | None:
    """``auto``: the accelerate config's choice if launched with one, else bf16 on CUDA
    (fp16 where bf16 is unsupported), bf16 on CPUs with AMX, and off on other CPUs, where
    autocast slows training."""
    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # let Accelerator read the launch config
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16_matrix_units() else "no"


def make_accelerator(cfg: Config) -> Accelerator:
    """The run's :class:`Accelerator`, then every generator seeded with ``train.seed``."""
    # Without a GPU, cpu=True is what makes Accelerate use gloo DDP under torchrun.
    use_cpu = (cfg.train.cpu or not torch.cuda.is_available()
               or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
    # Accelerate keeps one precision per process; a Trainer owns its Accelerator, so a later
    # run in the same process (a notebook, the tests) may choose another one.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision,
                                                "cpu" if use_cpu else "cuda"),
        gradient_accumulation_steps=cfg.train.grad_accumulation,
        cpu=use_cpu,
        dataloader_config=DataLoaderConfiguration(even_batches=True),
    )
    set_seed(cfg.train.seed)  # python, numpy and torch (and CUDA)
    return accelerator


def lr_factor(epoch: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to 1% (or constant), as a multiple of ``optim.lr``."""
    warm = cfg.optim.warmup_epochs
    if epoch < warm:
        return (epoch + 1) / (warm + 1)
    if cfg.optim.schedule == "constant":
        return 1.0
    t = (epoch - warm) / max(1, cfg.train.epochs - warm)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


# The global batch that optim.lr is given for: the seed recipe's 32 on one GPU.
REFERENCE_BATCH = 32


def global_batch(cfg: Config, num_processes: int) -> int:
    """Images per optimizer step: ``batch_size × processes × accumulation``."""
    return cfg.train.batch_size * num_processes * cfg.train.grad_accumulation


def scaled_lr(cfg: Config, num_processes: int) -> float:
    """``optim.lr`` scaled to the :func:`global_batch` against :data:`REFERENCE_BATCH`:
    ``linear`` multiplies by the ratio, ``sqrt`` by its square root, ``none`` leaves it."""
    ratio = global_batch(cfg, num_processes) / REFERENCE_BATCH
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.optim.scale_lr]
    return cfg.optim.lr * factor


def adam_implementation(setting: str, device_type: str) -> str:
    """``optim.implementation`` resolved for a device: ``auto`` is ``fused`` on CUDA, where the
    step is host-bound and fused Adam is 2 host calls a step against foreach's ~140 (128 of
    them per-parameter step counts read on the host; ``benchmarks/step_ops.py``), and
    ``torch`` (torch's own choice: foreach on CUDA, a for-loop on CPUs) elsewhere: on a CPU a
    ``configs/cpu_small.yaml`` step measured no faster fused, and the CPU results stay
    reproducible. The implementations compute the same Adam up to rounding."""
    if setting == "auto":
        return "fused" if device_type == "cuda" else "torch"
    return setting


def make_optimizer(params, cfg: Config, lr: float, device_type: str) -> torch.optim.Adam:
    """Adam at ``lr`` with ``optim.weight_decay``, in the kernels :func:`adam_implementation`
    picks for ``device_type``."""
    fused = adam_implementation(cfg.optim.implementation, device_type) == "fused"
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.optim.weight_decay,
                            fused=fused or None)


def uses_cuda_graphs(compile_mode: str) -> bool:
    """Whether ``torch.compile`` in this mode replays CUDA graphs, whose outputs are reused:
    each training step must then be marked as a new one
    (``torch.compiler.cudagraph_mark_step_begin``)."""
    return compile_mode in ("reduce-overhead", "max-autotune")


# train.compile: auto compiles a run of at least this many training batches per process. On
# an H200 (2026-11-28) the GPU config compiled (reduce-overhead) in about 29 s and then saved
# 11.4 ms a batch (4,237 against 1,690 img/s), repaid after about 2,600 batches; the
# throughput benchmark's compiled step repaid after about 1,900.
COMPILE_PAYS_AFTER_BATCHES = 2500


def resolve_compile(setting: str, mode: str, device: torch.device, processes: int,
                    batches: int) -> bool:
    """Whether ``train.compile`` compiles this run.

    Args:
        setting: ``"true"``, ``"false"`` or ``"auto"``: on only where it was measured to pay,
            one CUDA process in CUDA graphs (:func:`uses_cuda_graphs`) for at least
            :data:`COMPILE_PAYS_AFTER_BATCHES` batches. The ``default`` mode measured no
            faster on an H200, a CPU's compiled step 1.11x for 80 s of compiling, and
            compiled DDP has not run on a GPU.
        mode: ``train.compile_mode``.
        device: the process's device.
        processes: how many processes train.
        batches: training batches this process will run.
    """
    if setting != "auto":
        return setting == "true"
    return (device.type == "cuda" and processes == 1 and uses_cuda_graphs(mode)
            and batches >= COMPILE_PAYS_AFTER_BATCHES)


def compile_note(setting: str, compiled: bool, batches: int) -> str:
    """What the start line says of ``train.compile``: under ``auto``, the decision and why."""
    if setting != "auto":
        return ", compiled" if compiled else ""
    if compiled:
        return f", compiled (train.compile auto: {batches:,} batches)"
    return (f", eager (train.compile auto compiles one CUDA process in CUDA graphs for "
            f"{COMPILE_PAYS_AFTER_BATCHES:,}+ batches; this run: {batches:,})")


def compiles_augmentation(device: torch.device) -> bool:
    """Whether ``train.compile`` also compiles :class:`~brainseg_dist.augment.DeviceAugment`:
    on CUDA, where the sequential Kornia ops are launch-bound (6.7 of a 23.5 ms step on an
    H200, benchmarks/README.md). On a CPU, inductor's code for them measured 1.2x slower than
    eager (batch 32, 128², 1 and 2 threads), so there they stay eager."""
    return device.type == "cuda"


def compile_for_training(model: torch.nn.Module, augment: torch.nn.Module,
                         device: torch.device, mode: str = "default") -> bool:
    """``train.compile``: the model through :func:`compile_model`, and the augmentation with
    it where :func:`compiles_augmentation` (the same mode: under CUDA graphs both replay in
    the step that :func:`torch.compiler.cudagraph_mark_step_begin` marks).

    Returns:
        Whether the model is compiled.
    """
    compiled = compile_model(model, mode)
    if compiled and compiles_augmentation(device):
        compile_or_eager(augment, mode)
    return compiled


def compile_or_eager(module: torch.nn.Module, mode: str) -> None:
    """:func:`compile_model`, but a compiled call that fails (compiling happens at the first
    call of each input shape) warns once and runs the module eagerly from then on: Kornia
    code that inductor cannot compile must not stop a training run. An error that eager
    code raises too is still raised."""
    if not compile_model(module, mode):
        return
    compiled = module._compiled_call_impl  # what Module.compile() calls in place of forward

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            warn(f"train.compile: {type(module).__name__} did not compile ({reason}); it "
                 "runs eagerly")
            module._compiled_call_impl = None
            return module._call_impl(*args, **kwargs)

    module._compiled_call_impl = call


def compile_model(model: torch.nn.Module, mode: str = "default") -> bool:
    """``torch.compile`` the model's forward in place (:meth:`torch.nn.Module.compile`), so
    DDP, ``accelerator.unwrap_model`` and checkpoint keys see the plain U-Net. Where torch
    cannot compile on this platform, warns and leaves it eager.

    Args:
        model: the training model.
        mode: ``train.compile_mode`` (``reduce-overhead`` replays CUDA graphs).

    Returns:
        Whether the model is compiled.
    """
    try:
        model.compile(mode=None if mode == "default" else mode)
    except RuntimeError as exc:  # e.g. a Python version dynamo does not support yet
        warn(f"train.compile: torch.compile is unavailable here ({exc}); training eagerly")
        return False
    return True


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, start_epoch: int,
                   base_lr: float | None = None) -> LambdaLR:
    """Per-epoch :class:`LambdaLR` of :func:`lr_factor`, positioned at ``start_epoch`` (the
    optimizer's learning rate is ``base_lr × lr_factor(start_epoch)`` afterwards; ``base_lr``
    defaults to ``optim.lr``, training passes :func:`scaled_lr`)."""
    for group in optimizer.param_groups:  # a resumed optimizer may predate the scheduler
        group.setdefault("initial_lr", cfg.optim.lr if base_lr is None else base_lr)
    return LambdaLR(optimizer, lambda epoch: lr_factor(epoch, cfg), last_epoch=start_epoch - 1)


def prepare_data_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """The dataset root: ``data.data_dir``, or a synthetic dataset generated once per run."""
    root = rundir.data_root(cfg.train.output_dir, cfg.data.data_dir)
    if cfg.data.data_dir:
        return root
    done = root.parent / "COMPLETE"
    # The marker holds the parameters: a set made with other ones is replaced, not reused.
    key = f"patients={cfg.data.synthetic_patients} seed={cfg.train.seed}\n"
    if accelerator.is_main_process and not _marker_matches(done, key):
        done.unlink(missing_ok=True)
        if root.exists():
            shutil.rmtree(root)
        remove_temporaries(root.parent)
        write_synthetic_dataset(root, patients=cfg.data.synthetic_patients, seed=cfg.train.seed)
        atomic_write_text(done, key)
    accelerator.wait_for_everyone()
    return root


def _marker_matches(marker: Path, key: str) -> bool:
    try:
        return marker.read_text() == key
    except OSError:
        return False


def split_for_run(cfg: Config, data: SliceData, out: Path, resume: bool,
                  given: dict | None = None) -> dict:
    """The run's split: ``given`` (e.g. a cross-validation fold), the saved ``split.json``
    when resuming, else a new one from the config.

    Raises:
        BrainsegError: resuming with a ``given`` split that differs from the saved one.
    """
    path = out / rundir.SPLIT
    saved = load_split(path) if resume and path.exists() else None
    if given is not None:
        if saved is not None and any(saved.get(k) != given.get(k) for k in
                                     ("train", "val", "test")):
            raise BrainsegError(f"{path}: the run was trained on a different patient split")
        return given
    if saved is not None:
        return saved
    return make_split(patient_burden(data.table), cfg.data.val_fraction, cfg.data.test_fraction,
                      cfg.train.seed, cfg.data.folds, cfg.data.fold)

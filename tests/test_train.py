"""Training: run directory, resume, non-finite loss, early stopping, 1 vs 2 DDP processes."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from helpers import ddp_train_args, torchrun

from brainseg_dist import checkpoint
from brainseg_dist.augment import DeviceAugment
from brainseg_dist.config import AugmentConfig, load_config
from brainseg_dist.errors import NonFiniteLossError
from brainseg_dist.model import build_model
from brainseg_dist.train import (
    Trainer,
    lr_factor,
    resolve_mixed_precision,
    run_training,
    scaled_lr,
    setup,
)
from brainseg_dist.train import trainer as train_module
from brainseg_dist.train.step import LossTracker

REPO = Path(__file__).resolve().parent.parent
TINY = {"data.image_size": 32, "model.base_width": 4, "train.batch_size": 8,
        "train.num_overlays": 2, "optim.lr": 0.01, "augment.elastic_p": 0.5,
        "train.export": False}


def tiny_config(root, out, **overrides):
    return load_config(None, {**TINY, "data.data_dir": str(root) if root else None,
                              "train.output_dir": str(out), **overrides})


@pytest.fixture(scope="module")
def tiny_run(synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    cfg = tiny_config(synth_root, out, **{"train.epochs": 2, "data.cache_dir": str(cache)})
    return run_training(cfg), out


def test_run_directory(tiny_run):
    result, out = tiny_run
    for name in ("config.yaml", "split.json", "metrics.jsonl", "best.pt", "last.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for key in ("epoch", "train_loss", "val_loss", "val_dice", "val_dice_patient_mean", "lr",
                "time", "epoch_seconds"):
        assert all(key in r for r in rows), key
    assert result.epochs_run == 2
    split = json.loads((out / "split.json").read_text())
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert not parts[0] & parts[1]
    assert not parts[0] & parts[2]
    assert not parts[1] & parts[2]
    assert load_config(out / "config.yaml").data.image_size == 32
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == result.best_epoch
    assert best["metrics"]["val_dice_patient_mean"] == pytest.approx(
        result.best_dice_patient_mean)
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert {"format", "version", "model", "optimizer", "rng", "config", "config_hash"} <= set(last)
    assert checkpoint.load(out / "last.pt").image_size == 32


def test_tensorboard_has_scalars_and_overlays(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = tiny_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "val/loss", "val/dice", "val/dice_patient_mean", "train/lr"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("val/dice")] == [1, 2]
    images = events.Tags()["images"]
    assert len(images) == 1
    assert events.Images(images[0])[-1].width > 0


@pytest.mark.parametrize("on_device", ["false", "true"])
def test_resume_matches_uninterrupted_run(synth_root, tmp_path, on_device):
    data = {"data.on_device": on_device}
    full = run_training(tiny_config(synth_root, tmp_path / "full", **{"train.epochs": 3,
                                                                      **data}))
    part = tiny_config(synth_root, tmp_path / "part", **{"train.epochs": 3,
                                                         "train.stop_after_epoch": 2, **data})
    first = run_training(part)
    assert first.epochs_run == 2
    resumed = run_training(tiny_config(synth_root, tmp_path / "part", **{"train.epochs": 3,
                                                                         **data}),
                           resume=True)
    assert resumed.epochs_run == 3
    keys = ("train_loss", "val_loss", "val_dice", "val_dice_patient_mean", "lr")
    for a, b in zip(full.history, resumed.history, strict=True):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), (a["epoch"], k)
    saved = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().split("\n")
             if x]
    assert [r["epoch"] for r in saved] == [0, 1, 2]


def test_resume_without_checkpoint_is_a_clear_error(synth_root, tmp_path):
    from brainseg_dist.errors import BrainsegError

    with pytest.raises(BrainsegError, match="nothing to resume"):
        run_training(tiny_config(synth_root, tmp_path, **{"train.epochs": 1}), resume=True)


@pytest.mark.parametrize("on_device", ["false", "true"])
def test_non_finite_loss_stops_and_keeps_last_checkpoint(synth_root, tmp_path, monkeypatch,
                                                         on_device):
    """The loss is read every train.log_every steps: a NaN at step 3 of epoch 2 is seen at
    step 4 (log_every 4), names step 3, and leaves last.pt (epoch 1) untouched."""
    overrides = {"train.log_every": 4, "data.on_device": on_device}
    cfg = tiny_config(synth_root, tmp_path, **{"train.epochs": 1, **overrides})
    run_training(cfg)
    digest = hashlib.sha256((tmp_path / "last.pt").read_bytes()).hexdigest()

    real_loss = train_module.bce_dice_loss
    calls = {"n": 0}

    def exploding_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "bce_dice_loss", exploding_loss)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch 2, step 3 \(seen "
                                                 r"at step 4; train.log_every 4\)"):
        run_training(tiny_config(synth_root, tmp_path, **{"train.epochs": 3, **overrides}),
                     resume=True)
    assert calls["n"] == 4  # stopped at the first read after the bad step
    assert hashlib.sha256((tmp_path / "last.pt").read_bytes()).hexdigest() == digest
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0


def test_early_stopping(synth_root, tmp_path, monkeypatch):
    scores = iter([0.5, 0.4, 0.45, 0.3, 0.9])

    def fake_validate(self):
        d = next(scores)
        return {"val_dice": d, "val_dice_patient_mean": d, "val_dice_patient_median": d,
                "val_dice_tumour_slices": d, "val_loss": 1 - d}

    monkeypatch.setattr(train_module.Trainer, "validate", fake_validate)
    result = run_training(tiny_config(synth_root, tmp_path, **{"train.epochs": 5,
                                                               "train.patience": 2}))
    assert result.stopped_early
    assert result.epochs_run == 3
    assert result.best_epoch == 0


def test_no_data_dir_trains_on_synthetic_data_and_exports(tmp_path):
    cfg = tiny_config(None, tmp_path, **{"train.epochs": 1, "data.synthetic_patients": 4,
                                         "train.export": True})
    result = run_training(cfg)
    assert (tmp_path / "synthetic" / "kaggle_3m" / "data.csv").is_file()
    assert result.epochs_run == 1
    assert (tmp_path / "model.ts").is_file()  # the best model, exported when training ends
    assert (tmp_path / "model.pt2").is_file()


def test_lr_schedule_and_precision_defaults():
    cfg = load_config(None, {"train.epochs": 10, "optim.warmup_epochs": 1})
    factors = [lr_factor(e, cfg) for e in range(10)]
    assert factors[0] < factors[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[1:]))
    assert resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert resolve_mixed_precision("no", "cpu") == "no"


def test_runs_in_one_process_may_change_precision(synth_root, tmp_path):
    """Accelerate keeps one precision per process; each run gets the one it asks for."""
    for amp in ("bf16", "no"):
        cfg = tiny_config(synth_root, tmp_path / amp, **{"train.epochs": 1,
                                                         "train.mixed_precision": amp})
        run_training(cfg)
        assert AcceleratorState().mixed_precision == amp  # what the run actually used


@pytest.mark.parametrize(("amx", "expected"), [(True, "bf16"), (False, "no")])
def test_auto_precision_on_cpu_is_bf16_only_with_matrix_units(monkeypatch, amx, expected):
    """bf16 autocast triples training speed on a CPU with AMX and slows it on one without."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_mixed_precision("auto", "cpu") == expected
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probe
    assert resolve_mixed_precision("auto", "cpu") == "no"


def test_scaled_lr_follows_the_global_batch():
    cfg = load_config(None, {"train.batch_size": 64, "train.grad_accumulation": 2})
    lr = cfg.optim.lr
    assert scaled_lr(cfg, 2) == lr  # optim.scale_lr: none (the default)
    # global batch 64 × 2 processes × 2 accumulation = 256 = 8 × 32
    linear = load_config(None, {"train.batch_size": 64, "train.grad_accumulation": 2,
                                "optim.scale_lr": "linear"})
    assert scaled_lr(linear, 2) == pytest.approx(8 * lr)
    assert scaled_lr(linear, 1) == pytest.approx(4 * lr)
    sqrt = load_config(None, {"train.batch_size": 64, "train.grad_accumulation": 2,
                              "optim.scale_lr": "sqrt"})
    assert scaled_lr(sqrt, 2) == pytest.approx(8 ** 0.5 * lr)


def test_adam_implementation_is_fused_on_cuda_and_torchs_choice_elsewhere():
    """auto: fused where the step is host-bound (CUDA); on a CPU torch's own choice, so the
    CPU results recorded so far stay reproducible. An explicit setting is kept."""
    assert setup.adam_implementation("auto", "cuda") == "fused"
    assert setup.adam_implementation("auto", "cpu") == "torch"
    assert setup.adam_implementation("fused", "cpu") == "fused"
    assert setup.adam_implementation("torch", "cuda") == "torch"
    cfg = load_config(None, {"optim.weight_decay": 1e-4})
    for device, fused in (("cuda", True), ("cpu", None)):
        opt = setup.make_optimizer([torch.nn.Parameter(torch.zeros(2))], cfg, 0.01, device)
        assert opt.defaults["fused"] is fused
        assert opt.defaults["weight_decay"] == 1e-4


def test_fused_adam_trains_as_torchs_adam_and_resumes_from_its_state():
    """The fused kernels compute the same Adam (to rounding) and load the other's state, so a
    run may resume with either (optim.implementation is not part of the config hash)."""
    def stepped(impl, state=None, steps=3):
        torch.manual_seed(0)
        model = build_model(4, 2)
        cfg = load_config(None, {"optim.implementation": impl, "optim.weight_decay": 1e-4})
        opt = setup.make_optimizer(model.parameters(), cfg, 0.01, "cpu")
        if state is not None:
            opt.load_state_dict(copy.deepcopy(state))  # loading may keep its tensors
        for k in range(steps):
            torch.manual_seed(k)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()]), opt

    plain, opt = stepped("torch")
    fused, _ = stepped("fused")
    assert opt.defaults["fused"] is None
    assert not torch.equal(plain, fused)  # really another kernel
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    resumed, resumed_opt = stepped("fused", opt.state_dict(), steps=1)
    reference, _ = stepped("torch", opt.state_dict(), steps=1)
    torch.testing.assert_close(resumed, reference, rtol=1e-5, atol=1e-6)
    assert int(next(iter(resumed_opt.state.values()))["step"]) == 4


def test_scale_lr_is_applied_and_printed_at_start(synth_root, tmp_path, capsys):
    """The effective lr and the optimizer's kernels are printed at start."""
    cfg = tiny_config(synth_root, tmp_path, **{"train.epochs": 1, "optim.scale_lr": "linear",
                                               "optim.warmup_epochs": 0,
                                               "optim.implementation": "fused",
                                               "train.compile": "auto"})
    result = run_training(cfg)
    assert result.history[0]["lr"] == pytest.approx(0.01 * 8 / 32)  # batch 8, 1 process
    said = " ".join(capsys.readouterr().err.split())
    assert "lr 2.50e-03 (optim.lr 1.00e-02 scaled linear to global batch 8 from 32)" in said
    assert ", fused Adam" in said
    assert (", eager (train.compile auto compiles one CUDA process in CUDA graphs for 2,500+ "
            "batches; this run: ") in said  # why auto left it eager


# Compiling imports TorchScript's deprecated decorators (the deprecation is torch's, not ours).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_builds_a_compiled_model_with_plain_weights(synth_root, tmp_path):
    """torch.compile is lazy: building costs nothing, the first step compiles (slow test).
    The forward is compiled in place, so checkpoints keep the U-Net's keys, and the EMA copy
    runs its own weights."""
    trainer = Trainer(tiny_config(synth_root, tmp_path, **{"train.epochs": 1,
                                                           "train.compile": True,
                                                           "train.ema_decay": 0.9}))
    assert trainer.compiled
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model._compiled_call_impl is not None  # what Module.compile() sets
    assert trainer.ema.model._compiled_call_impl is None
    assert set(model.state_dict()) == set(build_model(4, 4).state_dict())  # checkpoint keys


def test_compile_auto_compiles_only_where_it_was_measured_to_pay():
    """``train.compile: auto``: one CUDA process, CUDA graphs, a run of at least
    COMPILE_PAYS_AFTER_BATCHES batches; true and false are followed anywhere."""
    cuda, cpu, enough = torch.device("cuda"), torch.device("cpu"), setup.COMPILE_PAYS_AFTER_BATCHES
    assert setup.resolve_compile("auto", "reduce-overhead", cuda, 1, enough)
    assert setup.resolve_compile("auto", "max-autotune", cuda, 1, enough)
    for mode, device, processes, batches in (
            ("reduce-overhead", cuda, 1, enough - 1),  # too short to repay the compile
            ("reduce-overhead", cuda, 2, enough),  # compiled DDP has not run on a GPU
            ("reduce-overhead", cpu, 1, 10 * enough),  # 1.11x after 80 s on the dev CPU
            ("default", cuda, 1, 10 * enough)):  # no faster than eager on an H200
        assert not setup.resolve_compile("auto", mode, device, processes, batches)
    assert setup.resolve_compile("true", "default", cpu, 2, 1)
    assert not setup.resolve_compile("false", "reduce-overhead", cuda, 1, 10 * enough)
    assert setup.compile_note("auto", True, 8600) == (", compiled (train.compile auto: 8,600 "
                                                      "batches)")
    assert (setup.compile_note("true", True, 1), setup.compile_note("false", False, 1)) == (
        ", compiled", "")


def test_compile_auto_counts_the_run_s_batches(synth_root, tmp_path, monkeypatch):
    """The trainer asks with this process's batches over every epoch, and a CPU run under
    auto stays eager; an old config's boolean reads as true/false."""
    asked = []
    monkeypatch.setattr("brainseg_dist.train.trainer.resolve_compile",
                        lambda *args: asked.append(args) or False)
    trainer = Trainer(tiny_config(synth_root, tmp_path, **{"train.epochs": 3,
                                                           "train.compile": "auto"}))
    assert not trainer.compiled
    (setting, mode, device, processes, batches), = asked
    assert (setting, mode, device.type, processes) == ("auto", "default", "cpu", 1)
    assert batches == 3 * len(trainer.train_batches) > 0
    assert load_config(None, {"train.compile": False}).train.compile == "false"


def test_train_compile_compiles_the_augmentation_on_cuda_only(monkeypatch):
    """On CUDA the Kornia ops are launch-bound and compile with the model (same mode); on a
    CPU inductor's code for them measured slower, so they stay eager there."""
    compiled = []
    monkeypatch.setattr(setup, "compile_model",
                        lambda module, mode: compiled.append((type(module).__name__, mode))
                        or True)
    model, augment = torch.nn.Identity(), DeviceAugment(AugmentConfig())
    for device in ("cpu", "cuda"):
        compiled.clear()
        assert setup.compile_for_training(model, augment, torch.device(device),
                                          "reduce-overhead")
        both = [("Identity", "reduce-overhead"), ("DeviceAugment", "reduce-overhead")]
        assert compiled == (both if device == "cuda" else both[:1]), device


def test_augmentation_that_fails_to_compile_runs_eagerly(monkeypatch, capsys):
    """A compiled call that fails warns once and leaves the module eager; errors that eager
    code raises too still reach the caller."""
    def broken_compile(module, _mode):
        def fails(*_args, **_kwargs):
            raise RuntimeError("InductorError: cannot lower op\nlong traceback")
        module._compiled_call_impl = fails
        return True

    monkeypatch.setattr(setup, "compile_model", broken_compile)
    augment = DeviceAugment(AugmentConfig(enabled=False))
    setup.compile_or_eager(augment, "reduce-overhead")
    images, masks = torch.rand(2, 3, 8, 8), torch.zeros(2, 1, 8, 8)
    assert augment(images, masks)[0] is images  # eager: disabled augmentation is the identity
    assert augment._compiled_call_impl is None
    said = capsys.readouterr().err
    assert said.count("did not compile") == 1
    assert "DeviceAugment did not compile (RuntimeError: InductorError: cannot lower op)" in (
        " ".join(said.split()))
    with pytest.raises(TypeError):
        augment(images)  # a caller's mistake is not swallowed


def test_validation_runs_a_compiled_model_eagerly(synth_root, tmp_path):
    """Validation (eval mode, a last smaller batch) would compile again; it runs eagerly,
    and compiled calls after it compile as before (the stance is put back)."""
    trainer = Trainer(tiny_config(synth_root, tmp_path, **{"train.epochs": 1}))
    compiled = []

    def backend(graph, _inputs):
        compiled.append(graph)
        return graph.forward

    model = trainer.accelerator.unwrap_model(trainer.model)
    model.compile(backend=backend)
    assert trainer.validate()["val_slices"] > 0
    assert compiled == []
    model.train()
    model(torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert len(compiled) == 1


def test_the_last_smaller_training_batch_runs_eagerly(synth_root, tmp_path):
    """Under ``train.compile`` the epoch's last, smaller batch runs eagerly: compiled, it would
    compile the model (and the augmentation) a second time, as dynamic shapes, and record new
    CUDA graphs (on an H200 the compiled run went past 100 s). The full batches compile once."""
    trainer = Trainer(tiny_config(synth_root, tmp_path, **{"train.epochs": 1}))
    sizes = [len(images) for images, _, _ in trainer.train_batches]
    assert sizes[-1] < sizes[0] == trainer.cfg.train.batch_size
    compiled = []

    def backend(graph, _inputs):
        compiled.append(graph)
        return graph.forward

    trainer.accelerator.unwrap_model(trainer.model).compile(backend=backend)
    trainer.compiled = True
    loss, _ = trainer.train_epoch(0, None, None)
    assert math.isfinite(loss)
    assert len(compiled) == 1


@pytest.mark.slow
def test_compiled_training_steps_match_eager(synth_root, tmp_path):
    """Two compiled training steps on CPU (inductor: most of a minute of compiling) give the
    eager steps' losses. A U-Net of depth 2: fewer kernels to generate and build (a cold
    compile of depth 4 took 66 s against 44 s here), the same compiled step."""
    losses = {}
    for compiled in (False, True):
        trainer = Trainer(tiny_config(synth_root, tmp_path / str(compiled), **{
            "train.epochs": 1, "train.compile": compiled, "data.on_device": "true",
            "model.depth": 2,
            # fp32: under bf16 autocast inductor's fusions round differently (about 1e-3).
            "train.mixed_precision": "no"}))
        tracker = LossTracker(trainer.accelerator)
        torch.manual_seed(0)
        for step, (images, masks, idx) in zip(range(2), trainer.train_batches, strict=False):
            trainer.train_step(images, masks, idx, tracker, step)
        losses[compiled] = tracker.read().epoch_loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.slow
def test_one_and_two_gloo_processes_report_the_same_validation(ddp_run, synth_root, tmp_path):
    """Validate the weights of a 2-process DDP run with 1 and with 2 processes.

    Batch 8 over 2 ranks leaves an uneven last batch, so this also checks that the padding
    duplicates are dropped before the per-patient Dice is computed.
    """
    out = tmp_path / "ddp"
    shutil.copytree(ddp_run, out)
    results = {}
    for nproc in (1, 2):
        job = torchrun([*ddp_train_args(synth_root, out), "--validate-only", out / "best.pt"],
                       nproc)
        log = job.communicate(timeout=300)[0]
        assert job.returncode == 0, log[-3000:]
        results[nproc] = json.loads((out / "validation.json").read_text())
    one, two = results[1], results[2]
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["val_slices"] == two["val_slices"]
    assert one["val_slices"] % 16 != 0  # the uneven case
    for key in ("val_loss", "val_dice", "val_dice_patient_mean", "val_dice_patient_median"):
        assert one[key] == pytest.approx(two[key], abs=1e-5), key


def test_volume_normalization_trains(synth_root, tmp_path):
    cfg = tiny_config(synth_root, tmp_path, **{"train.epochs": 1,
                                               "train.normalization": "volume"})
    result = run_training(cfg)
    assert result.history[0]["val_loss"] > 0
    assert checkpoint.load(tmp_path / "best.pt").normalization == "volume"

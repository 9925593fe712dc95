"""Export: parity with the eager model and the training path, metadata, any input size and
dtype, a fresh process without brainseg_dist, and the torch.export program."""

from __future__ import annotations

import dataclasses
import json
import site
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli, unwrap

from brainseg_dist.checkpoint import load as load_checkpoint
from brainseg_dist.config import replace
from brainseg_dist.data.decode import read_image, resize_image
from brainseg_dist.errors import BrainsegError
from brainseg_dist.export import ExportError, export_run, script_pipeline
from brainseg_dist.pipeline import (
    METADATA_FILE,
    build_pipeline,
    build_unet,
    load_torchscript,
    quiet_jit_deprecation,
)
from brainseg_dist.preprocess import normalize, volume_stats_by_patient


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """model.ts and model.pt2 of the trained run, written outside the run directory."""
    out = tmp_path_factory.mktemp("export") / "model.ts"
    with warnings.catch_warnings():
        # Export must not leak torch's TorchScript deprecation warnings: it filters them.
        warnings.filterwarnings("error", message=r"`torch\.jit", category=DeprecationWarning)
        return export_run(trained_run, out=out, verbose=False, onnx=False)  # test_onnx.py


@pytest.fixture(scope="module")
def ckpt(trained_run):
    return load_checkpoint(trained_run / "best.pt")


@pytest.fixture(scope="module")
def native_slices(trained_run):
    """Four native 256×256 slices of the run's synthetic dataset, uint8 N×3×H×W."""
    folders = sorted((trained_run / "synthetic" / "kaggle_3m").iterdir())
    folder = next(f for f in folders if f.is_dir())
    paths = [folder / f"{folder.name}_{n}.tif" for n in (3, 8, 12, 16)]
    return paths, torch.from_numpy(np.stack([read_image(p) for p in paths])).permute(0, 3, 1, 2)


def test_export_succeeds_with_parity(exported, ckpt):
    assert exported.torchscript.is_file()
    assert exported.max_abs_diff <= 1e-4
    assert exported.mask_pixels_differing == 0
    parity = exported.metadata["parity"]
    assert "slices of" in parity["source"]  # real dataset slices, not random fallback
    assert parity["max_abs_diff"] == exported.max_abs_diff
    assert not list(exported.torchscript.parent.glob(".*.tmp"))  # atomic: no leftovers


def test_metadata_attributes_and_extra_file(exported, ckpt):
    module, meta = load_torchscript(exported.torchscript)
    assert module.threshold == pytest.approx(ckpt.threshold)
    assert module.image_size == ckpt.image_size == 128
    assert module.normalization == ckpt.normalization == "slice"
    assert module.config_hash == ckpt.config_hash
    for key in ("threshold", "image_size", "normalization", "config_hash"):
        assert meta[key] == getattr(module, key), key
    assert meta["model_args"] == ckpt.model_args
    # the extra file is plain JSON readable with torch alone
    files = {METADATA_FILE: ""}
    with quiet_jit_deprecation():
        torch.jit.load(str(exported.torchscript), _extra_files=files)
    assert json.loads(files[METADATA_FILE])["config_hash"] == ckpt.config_hash


def test_any_size_and_dtype(exported, native_slices):
    module, _ = load_torchscript(exported.torchscript)
    _, x = native_slices
    with torch.no_grad():
        p_uint8 = module(x)
        p_float = module(x.float())
        assert p_uint8.shape == (4, 1, 256, 256)
        assert p_uint8.dtype == torch.float32
        assert torch.equal(p_uint8, p_float)
        assert float(p_uint8.min()) >= 0
        assert float(p_uint8.max()) <= 1
        for h, w in ((200, 240), (100, 100), (131, 77), (512, 384)):
            y = F.interpolate(x[:2].float(), size=(h, w), mode="bilinear").round()
            out = module(y.to(torch.uint8))
            assert out.shape == (2, 1, h, w), (h, w)
            assert torch.isfinite(out).all()
        assert module(x[:1]).shape == (1, 1, 256, 256)


def test_pipeline_matches_training_path(ckpt, native_slices):
    """Area-resize + round (resize_image), training normalization, U-Net, sigmoid, bilinear
    back to native size: the end-to-end pipeline reproduces it."""
    paths, x = native_slices
    small = torch.from_numpy(np.stack([resize_image(read_image(p), 128) for p in paths]))
    unet = build_unet(ckpt)
    with torch.no_grad():
        expected = F.interpolate(torch.sigmoid(unet(normalize(small, "slice"))),
                                 size=(256, 256), mode="bilinear", align_corners=False)
        got = build_pipeline(ckpt)(x)
    assert (got - expected).abs().max() < 1e-5


def test_volume_normalization_pipeline(ckpt, native_slices):
    """``volume``: statistics of the whole batch, as training's per-patient statistics."""
    paths, x = native_slices
    vol = dataclasses.replace(ckpt, config=replace(ckpt.config, train={"normalization": "volume"}))
    small = torch.from_numpy(np.stack([resize_image(read_image(p), 128) for p in paths]))
    stats = volume_stats_by_patient(small, np.zeros(len(small), int))
    with torch.no_grad():
        expected = F.interpolate(torch.sigmoid(build_unet(ckpt)(normalize(small, "volume",
                                                                          stats))),
                                 size=(256, 256), mode="bilinear", align_corners=False)
        eager = build_pipeline(vol)
        scripted = script_pipeline(vol)
        assert (eager(x) - expected).abs().max() < 1e-5
        assert (scripted(x) - expected).abs().max() < 1e-5
        # in batches, with the statistics of the whole stack
        s = scripted.volume_stats(scripted.prepare(x))
        parts = torch.cat([scripted.predict_with_stats(x[:2], s),
                           scripted.predict_with_stats(x[2:], s)])
        assert (parts - expected).abs().max() < 1e-5


def test_fresh_process_without_brainseg_dist(exported, native_slices, tmp_path):
    """model.ts in a process that has torch, numpy and tifffile but not brainseg_dist."""
    paths, x = native_slices
    # -S skips site-packages and their .pth files (one of them installs brainseg_dist's
    # editable finder); the child adds this environment's site-packages folders back as plain
    # path entries, so torch, numpy and tifffile import and brainseg_dist does not.
    packages = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.extend({packages!r})
        try:
            import brainseg_dist
        except ImportError:
            pass
        else:
            raise SystemExit("brainseg_dist is importable: " + brainseg_dist.__file__)
        import numpy as np, tifffile, torch, json
        warnings.simplefilter("ignore", DeprecationWarning)
        files = {{"metadata.json": ""}}
        m = torch.jit.load({str(exported.torchscript)!r}, _extra_files=files).eval()
        meta = json.loads(files["metadata.json"])
        paths = {[str(p) for p in paths]!r}
        x = torch.from_numpy(np.stack([tifffile.imread(p) for p in paths])).permute(0, 3, 1, 2)
        with torch.no_grad():
            masks = (m(x) > m.threshold).numpy()
        assert m.threshold == meta["threshold"]
        np.save("masks.npy", masks)
        print("ok", masks.shape)
    """)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "ok (4, 1, 256, 256)" in proc.stdout
    ckpt = load_checkpoint(exported.metadata["checkpoint"])
    with torch.no_grad():
        eager = (build_pipeline(ckpt)(x) > ckpt.threshold).numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "masks.npy"), eager)


def test_pt2_program_loads_and_agrees(exported, native_slices):
    assert exported.pt2 is not None
    assert exported.pt2.is_file()
    assert exported.pt2_dynamic == "batch+hw"
    assert exported.pt2_max_abs_diff <= 1e-4
    extra = {"metadata.json": ""}
    program = torch.export.load(str(exported.pt2), extra_files=extra).module()
    card = json.loads(extra["metadata.json"])  # the MONAI-style model card travels inside
    assert card["network_data_format"]["inputs"]["image"]["num_channels"] == 3
    module, _ = load_torchscript(exported.torchscript)
    _, x = native_slices
    with torch.no_grad():
        for y in (x, x[:1], x[:3, :, :200, :240].contiguous()):
            assert (program(y) - module(y)).abs().max() <= 1e-4


def test_export_errors(trained_run, tmp_path):
    with pytest.raises(BrainsegError, match="checkpoint not found"):
        export_run(trained_run, checkpoint="missing.pt", out=tmp_path / "m.ts")
    with pytest.raises(ExportError, match="differs from the eager model"):
        # a negative tolerance can never be met: the failure path, nothing written
        export_run(trained_run, out=tmp_path / "m.ts", tolerance=-1.0, pt2=False,
                   verbose=False)
    assert not (tmp_path / "m.ts").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_export_bad_run_dir(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    proc = run_cli(["export", tmp_path, "--no-pt2"])
    assert proc.returncode == 1
    assert f"{tmp_path / 'best.pt'}: unreadable checkpoint" in unwrap(proc.stderr)



@pytest.mark.parametrize(("norm", "layer"), [("instance", torch.nn.InstanceNorm2d),
                                             ("group", torch.nn.GroupNorm)])
def test_instance_norm_model_exports_with_parity(ckpt, native_slices, norm, layer):
    """A ``model.norm: instance`` (or ``group``) checkpoint rebuilds as that U-Net and
    scripts exactly."""
    _, x = native_slices
    torch.manual_seed(0)
    inst = dataclasses.replace(ckpt, config=replace(ckpt.config, model={"norm": norm}))
    state = build_unet(ckpt).state_dict()
    weights = {k: v for k, v in state.items() if "running" not in k and "tracked" not in k}
    inst = dataclasses.replace(inst, state={**ckpt.state, "model": weights})
    unet = build_unet(inst)
    assert any(isinstance(m, layer) for m in unet.modules())
    with torch.no_grad():
        assert (script_pipeline(inst)(x) - build_pipeline(inst)(x)).abs().max() < 1e-5

"""``model.onnx``: dynamo export, onnxruntime parity with the eager pipeline, embedded metadata,
``brainseg predict model.onnx``, and a clear line when the ``[onnx]`` extra is missing."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, run_cli

from brainseg_dist.errors import BrainsegError
from brainseg_dist.export import (
    build_pipeline,
    export_run,
    load_checkpoint,
    quiet_jit_deprecation,
)
from brainseg_dist.onnx_export import load_onnx, missing_packages, write_onnx
from brainseg_dist.predict import predict

pytestmark = pytest.mark.skipif(bool(missing_packages()),
                                reason=f"[onnx] extra not installed: {missing_packages()}")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.ts"
    return export_run(trained_run, out=out, pt2=False, verbose=False)


@pytest.fixture(scope="module")
def eager(trained_run):
    return build_pipeline(load_checkpoint(trained_run / "best.pt"))


def test_onnx_written_with_parity_and_metadata(exported, trained_run):
    assert exported.onnx is not None
    path = exported.torchscript.with_suffix(".onnx")
    assert exported.onnx.path == path
    assert path.is_file()
    assert exported.onnx.max_abs_diff <= 1e-4
    assert exported.onnx.mask_pixels_differing == 0
    model, meta = load_onnx(path)
    ckpt = load_checkpoint(trained_run / "best.pt")
    assert meta["threshold"] == ckpt.threshold == model.threshold
    assert meta["config_hash"] == ckpt.config_hash
    assert meta["onnx"]["input"].startswith("image: N×3×H×W uint8")


def test_model_card_beside_and_inside_every_export(exported, trained_run):
    """MONAI-bundle metadata: metadata.json beside the exports, and the same keys in model.ts
    (extra file) and model.onnx (metadata_props)."""
    beside = json.loads((exported.torchscript.parent / "metadata.json").read_text())
    files = {"metadata.json": ""}
    with quiet_jit_deprecation():
        torch.jit.load(str(exported.torchscript), _extra_files=files)
    inside_ts = json.loads(files["metadata.json"])
    _, inside_onnx = load_onnx(exported.onnx.path)
    for card in (beside, inside_ts, inside_onnx):
        fmt = card["network_data_format"]
        assert fmt["inputs"]["image"]["num_channels"] == 3
        assert fmt["inputs"]["image"]["value_range"] == [0, 255]
        assert fmt["inputs"]["image"]["channel_def"]["1"] == "FLAIR"
        assert fmt["outputs"]["pred"]["value_range"] == [0, 1]
        assert card["pytorch_version"] == torch.__version__.split("+")[0]
        assert card["training_data"]["synthetic"] is True
        assert card["metrics"]["validation"]["epoch"] == load_checkpoint(
            trained_run / "best.pt").epoch
        assert "protocol" in card["metrics"]["validation"]
    assert inside_ts["parity"]["max_abs_diff"] == exported.max_abs_diff


def test_onnx_dynamic_batch_and_size(exported, eager, trained_run):
    """Sizes the export never saw: batch 3, a wide odd crop (shrink) and a small grown one."""
    model, _ = load_onnx(exported.onnx.path)
    g = torch.Generator().manual_seed(1)
    big = (F.interpolate(torch.rand(3, 3, 40, 40, generator=g), size=(300, 280),
                         mode="bilinear") * 255).round().to(torch.uint8)
    for x in (big, big[:1, :, 17:250, 3:200].contiguous(), big[:2, :, :90, :70].contiguous()):
        with torch.no_grad():
            ref = eager(x)
        out = model(x)
        assert out.shape == (x.shape[0], 1, *x.shape[2:])
        assert float((ref - out).abs().max()) <= 1e-4


def test_predict_with_onnx_matches_torchscript(exported, trained_run, tmp_path):
    src = trained_run / "synthetic" / "kaggle_3m"
    folder = min((p for p in src.iterdir() if p.is_dir()), key=lambda p: p.name)
    ts = predict(exported.torchscript, folder, tmp_path / "ts", show_progress=False,
                 overlays=False)
    ox = predict(exported.onnx.path, folder, tmp_path / "onnx", show_progress=False,
                 overlays=False)
    assert ts.slices == ox.slices > 0
    assert ts.area["tumour_pixels"].tolist() == ox.area["tumour_pixels"].tolist()


def test_load_onnx_refuses_other_files(tmp_path, exported):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BrainsegError, match="not a loadable ONNX model"):
        load_onnx(bad)
    with pytest.raises(BrainsegError, match="run on the CPU"):
        load_onnx(exported.onnx.path, device="cuda")


def test_missing_extra_is_one_line_and_nothing_else_breaks(trained_run, tmp_path):
    """Without onnxruntime, `brainseg export` still writes model.ts and says why no .onnx."""
    block = textwrap.dedent("""
        import sys
        sys.modules["onnxruntime"] = None  # as if not installed: find_spec None, import fails
        from brainseg_dist.cli import main
        sys.argv = ["brainseg", "export", sys.argv[1], "--out", sys.argv[2], "--no-pt2"]
        main()
    """)
    import subprocess

    out = tmp_path / "m.ts"
    proc = subprocess.run([sys.executable, "-c", block, str(trained_run), str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
                          env={"BRAINSEG_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin", "COLUMNS": "300"})
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert out.is_file()
    assert not out.with_suffix(".onnx").exists()
    lines = [ln for ln in text.splitlines() if "onnx" in ln.lower()]
    assert len(lines) == 1, text
    assert "needs onnxruntime" in lines[0]
    assert "brainseg-dist[onnx]" in lines[0]
    assert "Traceback" not in text


def test_volume_normalization_is_refused_clearly(eager, capsys, tmp_path):
    vol = type(eager)(eager.unet, eager.image_size, "volume", eager.threshold, "x").eval()
    x = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    assert write_onnx(vol, x, [x], [vol(x)], tmp_path / "m.onnx", {}, 1e-4) is None
    assert "volume normalization" in capsys.readouterr().err.replace("\n", "")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_predict_onnx(exported, trained_run, tmp_path):
    src = trained_run / "synthetic" / "kaggle_3m"
    folder = min((p for p in src.iterdir() if p.is_dir()), key=lambda p: p.name)
    image = next(iter(sorted(folder.glob("*_1.tif"))))
    proc = run_cli(["predict", exported.onnx.path, image, tmp_path / "o", "--no-overlays"])
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / folder.name / f"{image.stem}_mask.tif").is_file()

"""The checkpoint schema: one save, one load; the config comes back typed; truncated, foreign
and newer files are refused with one line that names the file."""

from __future__ import annotations

import pytest
import torch

from brainseg_dist import checkpoint
from brainseg_dist.config import Config, load_config
from brainseg_dist.errors import BrainsegError
from brainseg_dist.model import build_model
from brainseg_dist.pipeline import build_pipeline


@pytest.fixture
def saved(tmp_path):
    cfg = load_config(None, {"model.base_width": 4, "model.depth": 2, "data.image_size": 32,
                             "train.normalization": "volume", "train.threshold": 0.4})
    model = build_model(4, 2, channels_last=False)
    path = checkpoint.save(tmp_path / "best.pt", model=model.state_dict(), config=cfg, epoch=3,
                           metrics={"val_loss": 1.0}, history=[{"epoch": 3}],
                           training={"rng": checkpoint.rng_state()})
    return path, cfg


def test_round_trip_gives_a_typed_config(saved):
    path, cfg = saved
    ckpt = checkpoint.load(path)
    assert isinstance(ckpt.config, Config)
    assert ckpt.config == cfg
    assert ckpt.config_hash == cfg.hash()
    assert (ckpt.image_size, ckpt.normalization, ckpt.threshold) == (32, "volume", 0.4)
    assert ckpt.model_args == {"base_width": 4, "depth": 2, "norm": "batch"}
    assert ckpt.epoch == 3
    assert ckpt.state["version"] == checkpoint.VERSION
    pipeline = build_pipeline(ckpt)
    assert pipeline.image_size == 32
    assert pipeline.normalization == "volume"


def test_resume_needs_the_training_state(saved):
    path, _ = saved
    with pytest.raises(BrainsegError, match=f"{path}: cannot resume from this checkpoint "
                                            r"\(missing optimizer"):
        checkpoint.load(path, require=checkpoint.RESUME_KEYS)


def test_newer_version_is_refused(saved):
    path, _ = saved
    state = torch.load(path, weights_only=True)
    state["version"] = checkpoint.VERSION + 1
    torch.save(state, path)
    with pytest.raises(BrainsegError, match=f"{path}: checkpoint format version "
                                            f"{checkpoint.VERSION + 1} is newer"):
        checkpoint.load(path)


@pytest.mark.parametrize("state", [{"format": "something-else", "version": 1, "model": {}},
                                   {"weights": torch.zeros(2)}])
def test_foreign_file_is_refused(tmp_path, state):
    path = tmp_path / "other.pt"
    torch.save(state, path)
    with pytest.raises(BrainsegError, match=f"{path}: not a brainseg checkpoint"):
        checkpoint.load(path)


def test_truncated_file_is_refused(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BrainsegError, match=f"{path}: unreadable checkpoint"):
        checkpoint.load(path)


def test_unversioned_checkpoint_still_reads(saved):
    """A checkpoint written before the schema had a version (same keys, no format/version,
    plus copies of image_size etc.) reads as version 0."""
    path, cfg = saved
    state = torch.load(path, weights_only=True)
    del state["format"], state["version"]
    state.update(image_size=32, normalization="volume", threshold=0.4,
                 model_args={"base_width": 4, "depth": 2})
    torch.save(state, path)
    assert checkpoint.load(path).config == cfg


def test_bad_config_is_named(saved):
    path, _ = saved
    state = torch.load(path, weights_only=True)
    state["config"]["train"]["normalization"] = "per-pixel"
    torch.save(state, path)
    with pytest.raises(BrainsegError, match=f"{path}: not a brainseg checkpoint \\(bad config"):
        checkpoint.load(path)

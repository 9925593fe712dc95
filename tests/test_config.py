"""Typed config: YAML files, overrides and the errors users see for bad configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_cli

from brainseg_dist.cli import parse_set_options
from brainseg_dist.config import SPEED_KEYS, Config, dump_config, load_config, replace
from brainseg_dist.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["demo.yaml", "cpu_small.yaml", "lgg_unet128.yaml",
                                  "experiments/cpu_small_v0.1.yaml",
                                  "experiments/cpu_small_bn.yaml",
                                  "experiments/lgg_unet128_seed.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    # The seed's batch 32, except where cross-validation measured another (docs/experiments.md).
    assert cfg.train.batch_size == (16 if name == "cpu_small.yaml" else 32)
    assert cfg.data.image_size == 128


def test_gpu_recipe_differs_from_its_baseline_only_in_the_cv_adopted_choices():
    """configs/lgg_unet128.yaml is its frozen predecessor plus the training choices that
    cross-validation adopted for the CPU recipe, and nothing else (benchmarks/gpu_cv.py pairs
    the two); the CPU recipe holds the same values. Speed keys (the same training to rounding)
    may differ: the GPU recipe compiles long runs."""
    new = load_config(REPO / "configs" / "lgg_unet128.yaml").to_dict()
    old = load_config(REPO / "configs" / "experiments" / "lgg_unet128_seed.yaml").to_dict()
    cpu = load_config(REPO / "configs" / "cpu_small.yaml").to_dict()
    changed = {(section, key) for section in new for key in new[section]
               if new[section][key] != old[section][key]
               and key not in SPEED_KEYS.get(section, ())}
    assert (new["train"]["compile"], new["train"]["compile_mode"]) == ("auto",
                                                                       "reduce-overhead")
    assert changed == {("augment", "gamma_p"), ("augment", "missing_sequence_p"),
                       ("optim", "dice"), ("train", "ema_decay"), ("train", "select"),
                       ("train", "patience")}
    assert all(new[section][key] == cpu[section][key] for section, key in changed)


def test_seed_defaults():
    cfg = Config()
    assert (cfg.train.batch_size, cfg.data.image_size, cfg.model.base_width) == (32, 128, 32)
    assert (cfg.optim.bce_weight, cfg.optim.dice_weight) == (1.0, 1.0)


def test_overrides_win_over_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  seed: 3\n")
    cfg = load_config(path, {"train.epochs": 2, "data.data_dir": "/x", "train.seed": None})
    assert cfg.train.epochs == 2
    assert cfg.train.seed == 3  # None overrides are ignored
    assert cfg.data.data_dir == "/x"


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, {"model.base_width": 8, "augment.elastic_p": 0.5})
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(("text", "message"), [
    ("trian:\n  epochs: 2\n", "unknown section 'trian'"),
    ("train:\n  epoch: 2\n", "unknown key 'train.epoch'"),
    ("train:\n  epochs: two\n", "train.epochs: expected an integer"),
    ("train:\n  mixed_precision: fp8\n", "train.mixed_precision must be one of"),
    ("data:\n  image_size: 100\n", "data.image_size must be"),
    ("optim:\n  lr: -1\n", "optim.lr must be > 0"),
    ("model:\n  foreground_prior: 1.0\n", "model.foreground_prior must be in [0, 1)"),
    ("augment:\n  hflip_p: 2\n", "augment.hflip_p in [0, 1]"),
    ("train: [1, 2]\n", "section 'train' must be a mapping"),
    ("train:\n  epochs: [\n", "not valid YAML"),
    ("data:\n  on_device: maybe\n", "data.on_device must be one of ('auto', 'true', 'false')"),
    ("data:\n  device_memory_budget: 0\n", "data.device_memory_budget in (0, 1]"),
    ("train:\n  log_every: 0\n", "train.log_every must be >= 1"),
    ("train:\n  compile: sometimes\n", "train.compile must be one of ('auto', 'true', "
                                       "'false')"),
    ("train:\n  compile_mode: fast\n", "train.compile_mode must be one of ('default', "
                                        "'reduce-overhead'"),
    ("optim:\n  scale_lr: cubic\n", "optim.scale_lr must be one of ('none', 'linear', 'sqrt')"),
])
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_hash_ignores_paths_and_run_length():
    a = load_config(None, {"train.output_dir": "a", "train.epochs": 3})
    b = load_config(None, {"train.output_dir": "b", "train.epochs": 9})
    c = load_config(None, {"model.base_width": 8})
    assert a.hash() == b.hash() != c.hash()


def test_on_device_takes_yaml_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  on_device: true\n")
    assert load_config(path).data.on_device == "true"
    assert load_config(None, {"data.on_device": False}).data.on_device == "false"
    assert Config().data.on_device == "auto"


def test_mixed_precision_takes_an_unquoted_no(tmp_path):
    """YAML reads `no` as false: `--set train.mixed_precision=no` must still mean fp32."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    overrides = parse_set_options(("train.mixed_precision=no",))
    assert load_config(None, overrides).train.mixed_precision == "no"


def test_speed_settings_keep_the_hash_of_older_runs():
    """Keys added for speed (where the data lives, how often the loss is read, compile, the
    optimizer's kernels) do not change what is trained; scale_lr and model.norm do only when
    set. So runs saved before the keys existed still resume: these are the hashes of the
    configs before them."""
    assert Config().hash() == "fd059d5e72e0"
    assert load_config(REPO / "configs" / "experiments" / "cpu_small_bn.yaml").hash() == (
        "820ce3fe8350")
    fast = load_config(None, {"data.on_device": "true", "train.log_every": 5,
                              "train.compile": True, "data.device_memory_budget": 0.5})
    assert fast.hash() == Config().hash()
    for impl in ("auto", "fused", "torch"):  # the optimizer's kernels: the same Adam
        assert load_config(None, {"optim.implementation": impl}).hash() == Config().hash()
    assert load_config(None, {"optim.scale_lr": "linear"}).hash() != Config().hash()
    assert load_config(None, {"model.norm": "instance"}).hash() != Config().hash()


def test_replace_validates():
    cfg = replace(Config(), train={"epochs": 4})
    assert cfg.train.epochs == 4
    with pytest.raises(ConfigError):
        replace(Config(), train={"epochs": 0})


def test_cli_bad_config_exits_nonzero(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: 0\n")
    result = run_cli(["train", "--config", str(path)])
    assert result.returncode == 1
    assert "train.batch_size must be >= 1" in result.stderr
    assert str(path) in result.stderr.replace("\n", "")
    result = run_cli(["train", "--set", "train.epochs"])
    assert result.returncode == 1
    assert "expected SECTION.KEY=VALUE" in result.stderr

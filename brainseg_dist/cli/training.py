"""``brainseg train`` and ``brainseg cv`` (also ``accelerate launch -m brainseg_dist.train``
and ``-m brainseg_dist.cv``): one typed config from the YAML file, named options and
``--set`` pairs."""

from __future__ import annotations

from pathlib import Path

import click

from brainseg_dist.cli.base import main, reports_errors
from brainseg_dist.config import MixedPrecision, Normalization, choices

TRAIN_OVERRIDES = {
    # option name: (config key, click type, help)
    "data_dir": ("data.data_dir", click.Path(file_okay=False), "Dataset root (kaggle_3m layout)."
                 " Without it a synthetic dataset is generated in the run directory."),
    "output_dir": ("train.output_dir", click.Path(file_okay=False), "Run directory."),
    "epochs": ("train.epochs", int, "Number of epochs."),
    "seed": ("train.seed", int, "Seed for split, shuffling, augmentation and init."),
    "batch_size": ("train.batch_size", int, "Batch size per process."),
    "lr": ("optim.lr", float, "Adam learning rate."),
    "image_size": ("data.image_size", int, "Training size S (S×S)."),
    "base_width": ("model.base_width", int, "U-Net channels at the first level."),
    "mixed_precision": ("train.mixed_precision", click.Choice(choices(MixedPrecision)),
                        "AMP mode (auto: accelerate config; bf16 on CUDA; off on CPU)."),
    "normalization": ("train.normalization", click.Choice(choices(Normalization)),
                      "Intensity normalization."),
    "patience": ("train.patience", int, "Early-stopping patience in epochs (0: off)."),
    "stop_after_epoch": ("train.stop_after_epoch", int,
                         "Stop this invocation after this epoch; continue with --resume."),
    "synthetic_patients": ("data.synthetic_patients", int, "Patients in the synthetic set."),
    "cache_dir": ("data.cache_dir", click.Path(file_okay=False), "Decoded-slice cache."),
}


def _train_options(fn):
    for name, (key, type_, help_) in reversed(TRAIN_OVERRIDES.items()):
        fn = click.option(f"--{name.replace('_', '-')}", name, type=type_, default=None,
                          help=f"{help_} [{key}]")(fn)
    return fn


def parse_set_options(pairs: tuple[str, ...]) -> dict[str, object]:
    """``("train.epochs=3", ...)`` -> ``{"train.epochs": 3}`` (values parsed as YAML).

    Raises:
        ConfigError: a pair is not ``SECTION.KEY=VALUE`` or its value is not valid YAML.
    """
    import yaml

    from brainseg_dist.errors import ConfigError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {pair!r}: expected SECTION.KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(f"--set {pair!r}: the value of {key.strip()} is not valid YAML "
                              f"({problem}); quote it if it is a string") from None
    return out


def override_sources(options: dict[str, object], set_pairs: tuple[str, ...]
                     ) -> dict[str, str]:
    """``{"train.epochs": "--epochs 3", ...}``: which flag set each overridden key."""
    sources = {TRAIN_OVERRIDES[k][0]: f"--{k.replace('_', '-')} {v}"
               for k, v in options.items() if k in TRAIN_OVERRIDES and v is not None}
    sources.update({"train.cpu": "--cpu", "data.skip_invalid": "--skip-invalid"})
    for pair in set_pairs:
        sources[pair.partition("=")[0].strip()] = f"--set {pair}"
    return sources


def end_distributed() -> None:
    """Tear down the process group (DDP under torchrun/accelerate launch) before exiting: a
    gloo rank that exits with the group alive can abort ("terminate called without an active
    exception") while its peer is still shutting down."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _config_from_options(config_path: Path | None, set_pairs: tuple[str, ...], cpu: bool | None,
                         skip_invalid: bool | None, options: dict):
    """The typed config: YAML file, then the named options, then ``--set`` pairs."""
    from brainseg_dist.config import load_config

    overrides = {TRAIN_OVERRIDES[k][0]: v for k, v in options.items()}
    overrides["train.cpu"] = cpu
    overrides["data.skip_invalid"] = skip_invalid
    overrides.update(parse_set_options(set_pairs))
    return load_config(config_path, overrides, override_sources(options, set_pairs))


def _config_options(fn):
    """``--config``, the training overrides, ``--cpu``, ``--skip-invalid`` and ``--set``."""
    fn = click.option("--set", "set_pairs", multiple=True, metavar="SECTION.KEY=VALUE",
                      help="Override any config value, e.g. --set augment.elastic_p=0.5.")(fn)
    fn = click.option("--skip-invalid", is_flag=True, default=None,
                      help="Drop bad slices with a warning instead of failing.")(fn)
    fn = click.option("--cpu", is_flag=True, default=None,
                      help="Train on CPU even if a GPU is present.")(fn)
    fn = _train_options(fn)
    return click.option("--config", "config_path",
                        type=click.Path(dir_okay=False, path_type=Path),
                        help="YAML config (see configs/).")(fn)


@click.command("train")
@_config_options
@click.option("--resume", is_flag=True, help="Continue the run in --output-dir from last.pt.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier run in --output-dir (its checkpoints, metrics, model.ts, "
                   "model.pt2 and eval_* are removed first).")
@click.option("--validate-only", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Only validate this checkpoint on the run's split; writes validation.json.")
@reports_errors
def train_command(config_path: Path | None, set_pairs: tuple[str, ...], resume: bool,
                  overwrite: bool, validate_only: Path | None, cpu: bool | None,
                  skip_invalid: bool | None, **options) -> None:
    """Train the U-Net (single process here; use accelerate launch for several)."""
    from brainseg_dist.rundir import prepare_run_dir
    from brainseg_dist.train import run_training

    cfg = _config_from_options(config_path, set_pairs, cpu, skip_invalid, options)
    if validate_only is not None:
        from brainseg_dist.train import validate_checkpoint

        validate_checkpoint(cfg, validate_only)
        end_distributed()
    else:
        prepare_run_dir(cfg.train.output_dir, resume=resume, overwrite=overwrite,
                        config_hash=cfg.hash())
        run_training(cfg, resume=resume)
        end_distributed()


main.add_command(train_command)


@click.command("cv")
@_config_options
@click.option("--folds", default=5, show_default=True, type=click.IntRange(min=2),
              help="Number of patient folds K.")
@click.option("--val-fraction", default=0.2, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of each fold's non-test patients used for model selection and the "
                   "post-processing choice.")
@click.option("--fold", "only_fold", type=click.IntRange(min=0), default=None,
              help="Train only this fold (0-based), e.g. one job per fold; the summary is "
                   "written by the call that finds every fold finished.")
@click.option("--split-seed", type=click.IntRange(0, 2**32 - 1), default=None,
              help="Seed of the folds (default: --seed). Fix it and vary --seed to retrain "
                   "the same folds with other seeds.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Folds trained at once, each as its own --fold process (logs in "
                   "--output-dir/jobs/); CPU threads are shared out, several GPUs taken "
                   "round-robin.")
@click.option("--train-only", is_flag=True, hidden=True,
              help="Train and stop; the caller evaluates (the jobs of --jobs).")
@reports_errors
def cv_command(config_path: Path | None, set_pairs: tuple[str, ...], cpu: bool | None,
               skip_invalid: bool | None, folds: int, val_fraction: float,
               only_fold: int | None, split_seed: int | None, jobs: int, train_only: bool,
               **options) -> None:
    """Patient-level K-fold cross-validation of a config over the patients of --data-dir.

    Trains every fold into --output-dir/fold_<k> (resumable), chooses post-processing on each
    fold's inner validation patients, tests each fold on its held-out patients, and writes
    cv_summary.json (per-patient Dice mean, median, 95% bootstrap CI), cv_per_patient.csv and
    a figure. `brainseg export DIR` then writes the fold ensemble as one model.ts."""
    import torch

    from brainseg_dist.cv import run_cv
    from brainseg_dist.tables import print_cv_summary

    cfg = _config_from_options(config_path, set_pairs, cpu, skip_invalid, options)
    device = "cuda" if torch.cuda.is_available() and not cfg.train.cpu else "cpu"
    result = run_cv(cfg, cfg.train.output_dir, folds=folds, val_fraction=val_fraction,
                    only_fold=only_fold, device=device, split_seed=split_seed, jobs=jobs,
                    evaluate=not train_only)
    end_distributed()
    if result is not None:
        print_cv_summary(result.summary, result.out)


main.add_command(cv_command)

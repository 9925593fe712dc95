"""``brainseg``: a thin click CLI over the library, for inspection and single-device runs."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from brainseg_dist import rundir
from brainseg_dist.config import EvalSplit, MixedPrecision, Normalization, choices
from brainseg_dist.console import console
from brainseg_dist.errors import BrainsegError


def reports_errors(fn):
    """Turn library errors into a clear message on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrainsegError as exc:
            _print_error(str(exc))
        except OSError as exc:
            # The file system refused (disk full, permissions, a path through a file):
            # a fault of the environment, named, not a bug of the program.
            if exc.filename is None:
                raise
            _print_error(f"{exc.filename}: {exc.strerror or exc}")

    return wrapper


def _print_error(message: str) -> None:
    console.print("[bold red]error:[/bold red] ", end="")
    console.print(message, highlight=False, markup=False, soft_wrap=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="brainseg-dist")
def main() -> None:
    """Segment FLAIR abnormalities (lower-grade gliomas) in brain MRI with a 2D U-Net."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--patients", default=12, show_default=True, type=click.IntRange(min=1),
              help="Number of patient folders.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1),
              help="Same seed, same files.")
@reports_errors
def synth(out: Path, patients: int, seed: int) -> None:
    """Write a synthetic dataset in the kaggle_3m layout to OUT."""
    from brainseg_dist.data.synth import write_synthetic_dataset

    with console.status(f"writing {patients} synthetic patients"):
        write_synthetic_dataset(out, patients=patients, seed=seed)
    console.print(f"wrote {patients} synthetic patients to {out}")


@main.group()
def data() -> None:
    """Inspect a kaggle_3m-style dataset."""


def _skip_invalid_option(fn):
    return click.option("--skip-invalid", is_flag=True,
                        help="Drop bad slices with a warning instead of failing.")(fn)


@data.command("summary")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of tables.")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path),
              help="Write sample-grid, class-balance and tumour-size PNGs here.")
@click.option("--image-size", default=128, show_default=True, type=click.IntRange(min=1),
              help="Training size to cache.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Decoded-slice cache (default ~/.cache/brainseg_dist).")
@_skip_invalid_option
@reports_errors
def data_summary(root: Path, as_json: bool, figures: Path | None, image_size: int,
                 cache_dir: Path | None, skip_invalid: bool) -> None:
    """Validate ROOT and print patients, slices, positives and tumour sizes."""
    from brainseg_dist.data import load_dataset
    from brainseg_dist.data.summary import summarize
    from brainseg_dist.io import check_writable, dumps_strict

    if figures is not None:
        check_writable(figures, "--figures folder")  # before the slices are decoded
    data = load_dataset(root, image_size=image_size, cache_dir=cache_dir,
                        skip_invalid=skip_invalid, show_progress=not as_json)
    summary = summarize(data.table)
    summary["skipped_slices"] = [str(p) for p in data.skipped]
    summary["timings"] = {k: round(v, 4) for k, v in data.timings.items()}
    if figures is not None:
        from brainseg_dist.viz import dataset_figures

        summary["figures"] = [str(p) for p in dataset_figures(data, figures)]
    if as_json:
        click.echo(dumps_strict(summary, indent=2))
    else:
        from brainseg_dist.tables import print_data_summary

        print_data_summary(summary)


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
@reports_errors
def cv_command(config_path: Path | None, set_pairs: tuple[str, ...], cpu: bool | None,
               skip_invalid: bool | None, folds: int, val_fraction: float,
               only_fold: int | None, **options) -> None:
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
                    only_fold=only_fold, device=device)
    end_distributed()
    if result is not None:
        print_cv_summary(result.summary, result.out)


main.add_command(cv_command)


# ----------------------------------------------------------------------------- evaluation
@main.command("evaluate")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(choices(EvalSplit)), default=None,
              help="Patients to evaluate: a part of the run's split.json, or all patients of "
                   "the root. Default: test on the run's own dataset, all with another "
                   "--data-dir.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Dataset root (default: the run's data.data_dir or its synthetic set).")
@click.option("--tta", is_flag=True, help="Headline = flip test-time augmentation.")
@click.option("--lcc", is_flag=True,
              help="Headline = largest 3D connected component per patient.")
@click.option("--checkpoint", default=rundir.BEST, show_default=True,
              help="Checkpoint file in RUN_DIR (or a path).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: RUN_DIR/eval_<split>].")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Slices per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@reports_errors
def evaluate_command(run_dir: Path, split: str | None, data_dir: Path | None, tta: bool,
                     lcc: bool, checkpoint: str, out: Path | None, batch_size: int,
                     device: str) -> None:
    """Score RUN_DIR's checkpoint on held-out patients.

    At native resolution: per-patient 3D Dice, slice-level metrics, HD95 and diagnosis, for
    the plain/TTA/LCC variants; writes per_patient.csv, summary.json and figures."""
    from brainseg_dist.evaluate import evaluate_run
    from brainseg_dist.tables import print_eval_summary

    result = evaluate_run(run_dir, split=split, data_dir=data_dir, tta=tta, lcc=lcc,
                          checkpoint=checkpoint, out=out, batch_size=batch_size, device=device)
    print_eval_summary(result.summary, result.out)


@main.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--checkpoint", default=rundir.BEST, show_default=True,
              help="Checkpoint file in RUN_DIR (or a path).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TorchScript file [default: RUN_DIR/model.ts]; model.pt2 goes next to it.")
@click.option("--tolerance", default=1e-4, show_default=True, type=click.FloatRange(min=0),
              help="Largest allowed |probability difference| against the eager model.")
@click.option("--no-pt2", is_flag=True, help="Skip the torch.export program (model.pt2).")
@click.option("--no-onnx", is_flag=True, help="Skip model.onnx (needs brainseg-dist[onnx]).")
@reports_errors
def export_command(run_dir: Path, checkpoint: str, out: Path | None, tolerance: float,
                   no_pt2: bool, no_onnx: bool) -> None:
    """Write model.ts (TorchScript), model.pt2 and model.onnx of a run.

    One end-to-end module (raw slices in, probabilities out), checked against the eager
    model before it is written. RUN_DIR may be a `brainseg cv` directory: then the module
    averages the folds (with the post-processing chosen on their out-of-fold predictions,
    applied by its segment() method)."""
    from brainseg_dist.export import export_ensemble, export_run
    from brainseg_dist.rundir import is_cv_dir

    if is_cv_dir(run_dir):
        export_ensemble(run_dir, out=out, tolerance=tolerance, pt2=not no_pt2)
        return

    export_run(run_dir, checkpoint=checkpoint, out=out, tolerance=tolerance, pt2=not no_pt2,
               onnx=not no_onnx)


@main.command("predict")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("paths", metavar="[INPUT] OUT", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("--pre", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Pre-contrast NIfTI volume (co-registered with the FLAIR one).")
@click.option("--flair", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="FLAIR NIfTI volume (instead of INPUT).")
@click.option("--post", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Post-contrast NIfTI volume (co-registered with the FLAIR one).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Slices per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None,
              help="Probability threshold [default: the model's training threshold].")
@click.option("--no-overlays", is_flag=True, help="Skip the overlay PNGs.")
@reports_errors
def predict_command(model: Path, paths: tuple[Path, ...], pre: Path | None, flair: Path | None,
                    post: Path | None, batch_size: int, device: str, threshold: float | None,
                    no_overlays: bool) -> None:
    """Segment new slices or volumes with an exported model.

    MODEL is model.ts, model.onnx or a run directory; INPUT a .tif slice, a patient folder,
    a kaggle_3m root, a FLAIR NIfTI volume (.nii/.nii.gz), nnU-Net-style CASE_000k.nii.gz
    files (0000 pre-contrast, 0001 FLAIR, 0002 post-contrast) or a folder of them; or leave
    INPUT out and give --flair (with --pre/--post). Writes masks (CASE_seg.nii.gz for NIfTI),
    overlays and tumour-size CSVs (mm³ for NIfTI) to OUT."""
    from brainseg_dist.export import export_run
    from brainseg_dist.predict import predict

    if len(paths) > 2:
        raise click.UsageError(f"expected [INPUT] OUT, got {len(paths)} paths")
    input_path, out = (None, paths[0]) if len(paths) == 1 else paths
    r = predict(model, input_path, out, batch_size=batch_size, device=device,
                threshold=threshold, overlays=not no_overlays, export_missing=export_run,
                pre=pre, flair=flair, post=post)
    if r.kind == "nifti":
        total = float(r.volume["volume_mm3"].sum()) if len(r.volume) else 0.0
        console.print(f"{r.folders} NIfTI case(s), {r.slices} axial slices in {r.seconds:.1f} s"
                      f"; tumour volume {total:.0f} mm³; wrote CASE_seg.nii.gz, "
                      f"tumour_volume.csv and tumour_area.csv to {r.out}", highlight=False)
        return
    total = int(r.volume["tumour_pixels"].sum()) if len(r.volume) else 0
    console.print(f"{r.slices} slice(s) in {r.folders} folder(s) ({r.kind}) in "
                  f"{r.seconds:.1f} s ({r.slices_per_second:.1f} slices/s); tumour pixels "
                  f"{total}; wrote masks, {'' if no_overlays else 'overlays, '}"
                  f"tumour_area.csv and tumour_volume.csv to {r.out}", highlight=False)


if __name__ == "__main__":
    main()

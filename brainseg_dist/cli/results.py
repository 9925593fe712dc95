"""``brainseg evaluate``, ``export`` and ``predict``: what a trained run or CV is for."""

from __future__ import annotations

from pathlib import Path

import click

from brainseg_dist import rundir
from brainseg_dist.cli.base import main, reports_errors
from brainseg_dist.config import EvalSplit, choices
from brainseg_dist.console import console


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
    from brainseg_dist.export import export_torchscript
    from brainseg_dist.predict import predict

    if len(paths) > 2:
        raise click.UsageError(f"expected [INPUT] OUT, got {len(paths)} paths")
    input_path, out = (None, paths[0]) if len(paths) == 1 else paths
    r = predict(model, input_path, out, batch_size=batch_size, device=device,
                threshold=threshold, overlays=not no_overlays, export_missing=export_torchscript,
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


def _check_output_files(**files: Path | None) -> None:
    """Before any work: the folder of each requested ``--OPTION`` file takes new files."""
    from brainseg_dist.io import check_writable

    for option, path in files.items():
        if path is not None:
            check_writable(path.parent, f"folder of the --{option} file")


@main.command("compare")
@click.argument("cv_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the comparison (per-patient Dice included) here.")
@click.option("--figure", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG: each patient's Dice under the first run against each other run.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Bootstrap seed.")
@click.option("--pool-seeds", is_flag=True,
              help="Runs that differ only in train.seed (and speed settings such as "
                   "train.compile) are one recipe: average each patient over its seeds, "
                   "compare the recipes, and show the seed spread.")
@reports_errors
def compare_command(cv_dirs: tuple[Path, ...], json_out: Path | None, figure: Path | None,
                    seed: int, pool_seeds: bool) -> None:
    """Compare `brainseg cv` runs on the same patients, patient by patient.

    The first CV_DIR is the reference. For each other run: the mean per-patient Dice
    difference with a bootstrap CI over patients, how many patients got better or worse,
    and which config keys differ. The comparison is paired, so it is much tighter than the
    two runs' own confidence intervals."""
    from brainseg_dist.compare import compare_runs
    from brainseg_dist.io import atomic_write_json
    from brainseg_dist.tables import paired_cell, print_comparison

    _check_output_files(json=json_out, figure=figure)
    result = compare_runs(list(cv_dirs), seed=seed, pool=pool_seeds)
    print_comparison(result)
    if json_out is not None:
        atomic_write_json(json_out, result)
        console.print(f"wrote {json_out}", highlight=False)
    if figure is not None:
        from brainseg_dist.viz import paired_dice

        variant = result["headline"] or next(iter(result["comparisons"][0]["paired"]))
        per_patient = result["per_patient"]
        paired_dice(per_patient[result["reference"]][variant],
                    {c["run"]: per_patient[c["run"]][variant] for c in result["comparisons"]},
                    result["reference"], figure,
                    {c["run"]: f"{variant}: {paired_cell(c['paired'][variant])}"
                     for c in result["comparisons"]})
        console.print(f"wrote {figure}", highlight=False)


@main.command("score")
@click.argument("pred", type=click.Path(path_type=Path))
@click.argument("truth", type=click.Path(path_type=Path))
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the per-case table here.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Write the summary here.")
@click.option("--figure", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG of the per-case Dice.")
@reports_errors
def score_command(pred: Path, truth: Path, csv_out: Path | None, json_out: Path | None,
                  figure: Path | None) -> None:
    """Score predicted masks in PRED against ground truth in TRUTH, case by case.

    NIfTI: CASE_seg.nii.gz in PRED (what predict writes) against CASE.nii.gz or
    CASE_seg.nii.gz in TRUTH, on the same voxel grid; 3D Dice, precision, recall, volumes
    in mm³ and HD95 in mm. kaggle_3m slices: <folder>/<name>_mask.tif in both, a folder
    per case. Any non-zero voxel is tumour; a truth case without a prediction is an error."""
    from brainseg_dist.io import atomic_write_json, atomic_write_text
    from brainseg_dist.score import score_folders
    from brainseg_dist.tables import print_scores

    _check_output_files(csv=csv_out, json=json_out, figure=figure)
    table, summary = score_folders(pred, truth)
    print_scores(table, summary)
    if csv_out is not None:
        atomic_write_text(csv_out, table.to_csv(index=False))
    if json_out is not None:
        atomic_write_json(json_out, summary)
    if figure is not None:
        from brainseg_dist.viz import dice_per_patient

        dice_per_patient(dict(zip(table["case"], table["dice"], strict=True)), figure,
                         f"Per-case Dice, {summary['cases']} case(s)")
    written = [str(p) for p in (csv_out, json_out, figure) if p is not None]
    if written:
        console.print(f"wrote {', '.join(written)}", highlight=False)

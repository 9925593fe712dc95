"""``brainseg synth`` and ``brainseg data summary``: make and inspect datasets."""

from __future__ import annotations

from pathlib import Path

import click

from brainseg_dist.cli.base import main, reports_errors
from brainseg_dist.console import console


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

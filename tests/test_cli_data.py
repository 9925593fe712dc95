"""The ``brainseg`` CLI data commands, run as real processes."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from helpers import (
    PNG_SIGNATURE,
    corrupted_copy,
    make_patient,
    run_cli,
    truncate_half,
    unwrap,
)

SUMMARY_KEYS = {"patients", "slices", "positive_slices", "negative_slices"}
FIGURES = ("samples.png", "class_balance.png", "tumour_sizes.png")


@pytest.fixture(scope="module")
def summary_run(synth_root, tmp_path_factory):
    """One ``data summary --json --figures`` run over the synthetic dataset."""
    out = tmp_path_factory.mktemp("cli_summary")
    result = run_cli(["data", "summary", synth_root, "--json", "--figures", out / "figures",
                      "--cache-dir", out / "cache"])
    return result, out


@pytest.fixture(scope="module")
def corrupted_root(synth_root, tmp_path_factory):
    """Two synthetic patients with one truncated image and one deleted mask (read-only)."""
    root = tmp_path_factory.mktemp("corrupted") / "kaggle_3m"
    return corrupted_copy(synth_root, root, truncate=(0, 5), delete_mask=(1, 7))


@pytest.fixture(scope="module")
def corrupted_run(corrupted_root, tmp_path_factory):
    """``data summary --json`` over the corrupted copy (fails)."""
    cache = tmp_path_factory.mktemp("corrupted_cache")
    return run_cli(["data", "summary", corrupted_root[0], "--json", "--cache-dir", cache])


def test_synth_command(tmp_path):
    out = tmp_path / "synthetic"
    result = run_cli(["synth", out, "--patients", "3", "--seed", "1"])
    assert result.returncode == 0, result.stderr
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 3
    assert all(p.name.startswith("TCGA_") for p in folders)
    assert all(any(p.glob("*_mask.tif")) for p in folders)
    clinical = pd.read_csv(out / "data.csv")
    assert sorted(clinical["Patient"]) == sorted(p.name[:12] for p in folders)
    assert "wrote 3 synthetic patients" in result.stdout + result.stderr


def test_summary_json_counts(summary_run, synth_data):
    result, _ = summary_run
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout is pure JSON
    assert set(summary) >= SUMMARY_KEYS
    table = synth_data.table
    assert summary["patients"] == table["patient"].nunique() == 8
    assert summary["slices"] == len(table)
    assert summary["positive_slices"] == int((table["diagnosis"] == 1).sum())
    assert summary["negative_slices"] == int((table["diagnosis"] == 0).sum())
    assert summary["positive_slices"] + summary["negative_slices"] == summary["slices"]
    assert summary["positive_slices"] > 0
    assert summary["slices_per_site"] == {
        str(k): int(v) for k, v in table.groupby("site").size().items()}
    assert summary["skipped_slices"] == []
    assert summary["timings"]["patients"] == 8


def test_summary_figures(summary_run):
    result, out = summary_run
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    written = [out / "figures" / name for name in FIGURES]
    assert sorted(summary["figures"]) == sorted(str(p) for p in written)
    for path in written:
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE, path
        assert len(data) > 10_000, path
    assert not list((out / "figures").glob(".*")), "no temporary files left behind"


def test_summary_table_output_second_run_from_cache(synth_root, summary_run):
    first, out = summary_run
    counts = json.loads(first.stdout)
    result = run_cli(["data", "summary", synth_root, "--cache-dir", out / "cache"])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "Dataset summary" in text
    for key in ("patients", "slices", "positive_slices", "negative_slices"):
        label = key.replace("_", " ")
        assert re.search(rf"{label}\s*│\s*{counts[key]}\s", text), (label, text)
    assert "8/8 patients from cache" in text


def test_corrupted_dataset_fails_naming_both_files(corrupted_root, corrupted_run):
    _, truncated, deleted, _ = corrupted_root
    result = corrupted_run
    assert result.returncode == 1
    assert result.stdout == ""
    err = unwrap(result.stderr)
    assert "error:" in err
    assert "2 problem(s)" in err
    assert truncated.name in err
    assert "truncated" in err
    assert deleted.name in err  # named as the missing mask of its image
    assert deleted.name.replace("_mask", "") in err
    assert "Traceback" not in result.stderr


def test_error_lines_hold_whole_long_paths(tmp_path):
    root = tmp_path.joinpath(*[f"a_rather_long_directory_name_{i}" for i in range(4)], "kaggle_3m")
    make_patient(root, "TCGA_CS_4943_20000902", slices=(1, 2))
    truncated = truncate_half(root / "TCGA_CS_4943_20000902" / "TCGA_CS_4943_20000902_2.tif")
    assert len(str(truncated)) > 130
    result = run_cli(["data", "summary", root, "--json"])
    assert result.returncode == 1
    assert truncated.name in unwrap(result.stderr)
    # a user grepping a log, or copying the path, needs it whole on one line
    assert any(str(truncated) in line for line in result.stderr.splitlines()), result.stderr


def test_corrupted_dataset_with_skip_invalid(corrupted_root):
    root, truncated, deleted, n_slices = corrupted_root
    result = run_cli(["data", "summary", root, "--json", "--skip-invalid"])
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["patients"] == 2
    # n_slices counts the pair that lost its mask; both bad slices are dropped
    assert summary["slices"] == n_slices - 2
    assert len(summary["skipped_slices"]) == 2
    skipped = " ".join(summary["skipped_slices"])
    assert str(truncated) in skipped
    assert deleted.name in skipped
    assert "warning" in result.stderr
    assert truncated.name in unwrap(result.stderr)


def test_empty_dir_fails(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(["data", "summary", empty, "--json"])
    assert result.returncode == 1
    assert result.stdout == ""
    err = unwrap(result.stderr)
    assert "error:" in err
    assert "empty" in err
    assert "Traceback" not in result.stderr


def test_summary_table_in_process(synth_root, capsys):
    """The table ``brainseg data summary`` prints, from the library's summary of a root."""
    from brainseg_dist.data import load_dataset
    from brainseg_dist.data.summary import summarize
    from brainseg_dist.tables import print_data_summary

    data = load_dataset(synth_root, image_size=32, show_progress=False)
    summary = {**summarize(data.table), "skipped_slices": [],
               "timings": {k: round(v, 4) for k, v in data.timings.items()}}
    print_data_summary(summary)
    out = capsys.readouterr().out
    assert "Dataset summary" in out
    assert f"{summary['patients']}" in out
    assert "decode time" in out

"""Console reports of results: the dataset summary, an evaluation and a cross-validation,
as rich tables. Figures are :mod:`brainseg_dist.viz`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from brainseg_dist.console import console


def fmt(x: Any, digits: int = 3) -> str:
    """A metric for a table: ``–`` when missing or not finite."""
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) \
        else f"{x:.{digits}f}"


# The metric rows of an evaluation and of a cross-validation, shared by the console tables
# here and report.html (brainseg_dist.report): (label, cell of one variant's metrics).
EVAL_ROWS = [
    ("patient Dice mean ± SD", lambda m: f"{fmt(m['patient_dice']['mean'])} ± "
                                         f"{fmt(m['patient_dice']['sd'])}"),
    ("patient Dice median", lambda m: fmt(m["patient_dice"]["median"])),
    ("Dice, tumour slices", lambda m: fmt(m["slice"]["dice_tumour_slices"])),
    ("FP rate, empty slices", lambda m: fmt(m["slice"]["fp_rate_empty_slices"])),
    ("IoU (pooled)", lambda m: fmt(m["slice"]["iou"])),
    ("precision / recall", lambda m: f"{fmt(m['slice']['precision'])} / "
                                     f"{fmt(m['slice']['recall'])}"),
    ("HD95 px mean (slices)", lambda m: f"{fmt(m['slice']['hd95_mean'], 1)} "
                                        f"({m['slice']['hd95_slices']})"),
    ("sensitivity / specificity", lambda m: f"{fmt(m['diagnosis']['sensitivity'])} / "
                                            f"{fmt(m['diagnosis']['specificity'])}"),
]
# (label, key of a CV variant's metrics); the 95% CI row is :func:`ci_cell`.
CV_ROWS = [("patient Dice mean", "dice_patient_mean"), ("patient Dice median",
                                                        "dice_patient_median"),
           ("patient Dice SD", "dice_patient_sd"), ("patient Dice min", "dice_patient_min"),
           ("Dice, tumour slices", "dice_tumour_slices"),
           ("FP rate, empty slices", "fp_rate_empty_slices"),
           ("slice sensitivity", "sensitivity"), ("slice specificity", "specificity"),
           ("HD95 px (mean)", "hd95_mean")]


def ci_text(interval: list[float]) -> str:
    """``[low, high]`` of a confidence interval."""
    return "[{}, {}]".format(*(fmt(v) for v in interval))


def ci_cell(metrics: dict[str, Any]) -> str:
    """``[low, high]`` of a CV variant's per-patient Dice CI."""
    return ci_text(metrics["dice_patient_ci95"])


def print_data_summary(s: dict) -> None:
    """``brainseg data summary``: counts, sizes, sites and decode time."""
    t = Table(title="Dataset summary", show_header=False)
    for key in ("patients", "slices", "positive_slices", "negative_slices",
                "patients_with_tumour"):
        t.add_row(key.replace("_", " "), str(s[key]))
    t.add_row("positive fraction", f"{s['positive_fraction']:.1%}")
    spp = s["slices_per_patient"]
    t.add_row("slices per patient", f"{spp['min']}–{spp['max']} (median {spp['median']:.0f})")
    ts = s["tumour_pixels_per_positive_slice"]
    t.add_row("tumour px / positive slice",
              f"median {ts['median']:.0f}, p5–p95 {ts['p5']:.0f}–{ts['p95']:.0f}, "
              f"max {ts['max']:.0f}")
    for site, n in s["slices_per_site"].items():
        t.add_row(f"site {site}", f"{n} slices, {s['patients_per_site'][site]} patients")
    tm = s["timings"]
    t.add_row("decode time", f"{tm['decode_seconds']:.2f} s "
              f"({int(tm['patients_from_cache'])}/{int(tm['patients'])} patients from cache)")
    if s["skipped_slices"]:
        t.add_row("skipped", str(len(s["skipped_slices"])))
    out = Console()  # the summary is the command's output: stdout, unlike progress and logs
    out.print(t)
    for f in s.get("figures", []):
        out.print(f"figure: {f}")


def print_eval_summary(s: dict[str, Any], out: Path) -> None:
    """``brainseg evaluate``: the headline metrics of every variant (headline marked)."""
    t = Table(title=f"{s['split']}: {s['patients']} patients, {s['slices']} slices "
                    f"({Path(s['checkpoint']).name}, threshold {s['threshold']:g})")
    t.add_column("metric")
    for v in s["variants"]:
        t.add_column(v + (" *" if v == s["headline"] else ""), justify="right")
    rows = [*EVAL_ROWS, ("slice accuracy", lambda m: fmt(m["diagnosis"]["accuracy"]))]
    for name, f in rows:
        t.add_row(name, *(f(s["variants"][v]) for v in s["variants"]))
    console.print(t)
    console.print(f"headline ({s['headline']}): per-patient Dice "
                  f"{fmt(s['headline_metrics']['mean'])} ± {fmt(s['headline_metrics']['sd'])}"
                  f"; outputs in {out}", highlight=False)


def print_cv_summary(s: dict[str, Any], out: Path) -> None:
    """``brainseg cv``: the metrics without and with the chosen post-processing."""
    t = Table(title=f"{s['folds']}-fold cross-validation: {s['patients']} patients, each "
                    "tested by the fold that never saw it")
    t.add_column("metric")
    names = list(s["variants"])
    for name in names:
        t.add_column(name, justify="right")
    t.add_row("95% CI of the mean", *(ci_cell(s["variants"][n]) for n in names))
    for label, key in CV_ROWS:
        t.add_row(label, *(fmt(s["variants"][n][key]) for n in names))
    console.print(t)
    console.print(f"headline ({s['headline']}): per-patient Dice mean "
                  f"{fmt(s['dice_patient_mean'])}, median {fmt(s['dice_patient_median'])}, "
                  f"95% CI {ci_text(s['dice_patient_ci95'])}"
                  f"; outputs in {out}", highlight=False)


def _signed(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:+.3f}"


def paired_cell(d: dict[str, Any]) -> str:
    """``+0.025 [+0.003, +0.049], 15↑ 5↓`` of a :func:`brainseg_dist.compare.paired_difference`."""
    lo, hi = d["ci95"]
    return (f"{_signed(d['mean'])} [{_signed(lo)}, {_signed(hi)}], {d['better']}↑ "
            f"{d['worse']}↓" + (f" {d['unchanged']}=" if d["unchanged"] else ""))


def print_comparison(c: dict[str, Any]) -> None:
    """``brainseg compare``: each run's own figures, then each paired difference."""
    variants = list(next(iter(c["runs"].values())))
    t = Table(title=f"Per-patient Dice of {len(c['runs'])} CV runs on the same "
                    f"{c['patients']} patients (mean, median, 95% CI of the mean)")
    t.add_column("run")
    for v in variants:
        t.add_column(v, justify="right")
    for run, by_variant in c["runs"].items():
        t.add_row(run, *(f"{fmt(m['dice_patient_mean'])}, {fmt(m['dice_patient_median'])}, "
                         + (ci_cell(m) if m.get("dice_patient_ci95") else "–")
                         for m in (by_variant.get(v, {}) for v in variants)))
    console.print(t)
    for comp in c["comparisons"]:
        d = Table(title=f"{comp['run']} − {c['reference']}, patient by patient "
                        f"({'same' if comp['same_folds'] else 'DIFFERENT'} folds)")
        d.add_column("variant")
        d.add_column("mean difference [95% CI], better/worse", justify="right")
        d.add_column("largest gain / loss")
        for v, p in comp["paired"].items():
            (gp, gd), (lp, ld) = p["largest_gain"], p["largest_loss"]
            d.add_row(v, paired_cell(p), f"{gp} {_signed(gd)} / {lp} {_signed(ld)}")
        console.print(d)
        changes = comp["config_changes"]
        console.print("recipe changes: " + ("; ".join(f"{k} {a} → {b}" for k, (a, b)
                                                     in changes.items()) or "none"),
                      highlight=False, soft_wrap=True)
    if c.get("seed_spread"):
        s = Table(title="seed spread: runs of one recipe against each other, patient by "
                        "patient (what a reseed alone moves)")
        s.add_column("runs")
        for v in c["seed_spread"][0]["paired"]:
            s.add_column(v, justify="right")
        for pair in c["seed_spread"]:
            s.add_row(f"{pair['run']} − {pair['reference']}",
                      *(paired_cell(p) for p in pair["paired"].values()))
        console.print(s)
    console.print(f"note: {c['note']}", highlight=False, soft_wrap=True)


def print_scores(table: Any, s: dict[str, Any], worst: int = 5) -> None:
    """``brainseg score``: the summary over cases, then the worst cases."""
    units = s["units"]
    t = Table(title=f"{s['cases']} case(s) ({s['layout']}): predictions against ground truth")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("Dice mean [95% CI]", f"{fmt(s['dice_mean'])} {ci_text(s['dice_ci95'])}")
    t.add_row("Dice median / SD / min", f"{fmt(s['dice_median'])} / {fmt(s['dice_sd'])} / "
                                        f"{fmt(s['dice_min'])}")
    t.add_row("cases below 0.5", str(s["cases_below_0.5"]))
    t.add_row("|volume difference|, median", fmt(s["volume_abs_difference_median"]))
    t.add_row(f"HD95 mean / median, {units['hd95']}", f"{fmt(s['hd95_mean'], 1)} / "
                                                     f"{fmt(s['hd95_median'], 1)}")
    console.print(t)
    w = Table(title=f"lowest Dice (volumes in {units['volume']})")
    for col in ("case", "Dice", "precision", "recall", "truth volume", "predicted volume"):
        w.add_column(col, justify="left" if col == "case" else "right")
    for r in table.head(worst).itertuples():
        w.add_row(r.case, fmt(r.dice), fmt(r.precision), fmt(r.recall),
                  f"{r.truth_volume:.0f}", f"{r.pred_volume:.0f}")
    console.print(w)

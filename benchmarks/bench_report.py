"""Throughput benchmark, output: the rich tables of a result."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)

def print_tables(res: dict[str, Any], out: Console) -> None:
    hw = res["hardware"]
    t = Table(title="Hardware", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("device", f"{hw['device']} ({hw['device_name']})")
    t.add_row("CPU", f"{hw['cpu_model']}, {hw['cpu_cores_usable']} usable cores, "
                     f"torch threads {hw['torch_threads']}, "
                     f"AMX {'yes' if hw.get('cpu_amx') else 'no'}")
    t.add_row("versions", f"torch {hw['torch']}, kornia {hw['kornia']}, accelerate "
                          f"{hw['accelerate']}, python {hw['python']}")
    s = res["settings"]
    t.add_row("settings", f"mode {s['mode']}, batch {s['batch_size']}, image "
                          f"{s['image_size']}, base width {s['base_width']}, {s['steps']} steps "
                          f"after {s['warmup']} warm-up, loader workers {s['workers']}")
    t.add_row("load average", f"start {res['load_average']['start']}, end "
                              f"{res['load_average']['end']}")
    out.print(t)

    d = res["data"]
    t = Table(title=f"Data ({d['source']}: {d['patients']} patients, {d['slices']} slices)")
    for c in ("stage", "slices/s", "seconds", "vs cold"):
        t.add_column(c, justify="right" if c != "stage" else "left")
    t.add_row("tif decode (empty cache)", _f(d["cold_slices_per_s"], "{:.0f}"),
              _f(d["cold_decode_seconds"]), "1.00x")
    t.add_row("from the decoded cache", _f(d["cached_slices_per_s"], "{:.0f}"),
              _f(d["cached_decode_seconds"], "{:.3f}"), _f(d["cache_speedup"], "{:.1f}x"))
    out.print(t)

    tr = res["train"]
    t = Table(title="Training throughput (full step incl. data loading)")
    for c in ("pipeline", "img/s", "median step ms", "vs baseline", "vs project",
              "best step: vs baseline / project", "AMP", "ch-last", "augment"):
        t.add_column(c, justify="left" if c in ("pipeline", "augment") else "right",
                     no_wrap=c == "pipeline")
    rows = [("baseline", tr["baseline"]), ("project", tr["project"]),
            *tr["ablations"].items(), *tr["baseline_sweep"].items()]
    for name, r in rows:
        best = _f(r["speedup_vs_baseline_best"], "{:.2f}x")
        if "ratio_vs_project_best" in r:
            best += " / " + _f(r["ratio_vs_project_best"], "{:.2f}x")
        t.add_row(name, _f(r["images_per_s"], "{:.1f}"), _f(r["median_step_s"] * 1000, "{:.0f}"),
                  _f(r["speedup_vs_baseline"], "{:.2f}x"),
                  _f(r.get("ratio_vs_project"), "{:.2f}x"), best, r["mixed_precision"],
                  "yes" if r["channels_last"] else "no",
                  "device" if r["augmentation"].startswith("device") else
                  f"CPU, {r['loader']}")
    out.print(t)
    for mode, c in tr.get("compile", {}).items():
        if "compile_seconds" not in c:
            out.print(f"torch.compile, mode {mode}: {c['status']} ({c['reason']})",
                      highlight=False)
            continue
        out.print(f"torch.compile, mode {mode} (timed beside an eager project pipeline): "
                  f"{c['median_step_s'] * 1000:.1f} against {c['eager_median_step_s'] * 1000:.1f}"
                  f" ms per step ({c['ratio_vs_project']:.2f}x); first step "
                  f"{c['first_step_s']:.1f} s, so about {c['compile_seconds']:.1f} s of "
                  f"compiling; pays for itself after "
                  + (f"{c['break_even_steps']:.0f} steps" if c["break_even_steps"] else
                     "never (not faster here)"), highlight=False)

    au = res["augment"]
    t = Table(title=f"Augmentation on its own (batch {au['batch_size']}, on the device)")
    for c in ("stage", "ms per batch", "share of the project step"):
        t.add_column(c, justify="left" if c == "stage" else "right")
    t.add_row("normalization (per-slice z-score)", _f(au["normalize_ms"]),
              _f(au["normalize_ms"] / au["project_step_ms"], "{:.1%}"))
    default, other = ("fused", "sequential") if au["fused_is_default"] else ("sequential",
                                                                          "fused")
    t.add_row(f"DeviceAugment, {default} geometry (the default)", _f(au["augment_ms"]),
              _f(au["augment_share_of_step"], "{:.1%}"))
    t.add_row(f"DeviceAugment, {other} geometry (augment.fused toggled)",
              _f(au["augment_other_ms"]), _f(au["augment_other_share_of_step"], "{:.1%}"))
    for mode, ms in au.get("augment_compiled_ms", {}).items():
        share = res["summary"].get("augment_compiled_share_of_step", {}).get(mode)
        t.add_row(f"DeviceAugment, {default}, compiled (mode {mode}); share of the compiled "
                  "step", _f(ms) if isinstance(ms, float) else "failed",
                  _f(share, "{:.1%}"))
    for name, ms in [*au["ops_ms"].items(), ("one-grid geometry", au["fused_geometry_ms"])]:
        t.add_row(f"  {name} alone", _f(ms), _f(ms / au["project_step_ms"], "{:.1%}"))
    t.add_row("project training step", _f(au["project_step_ms"]), "100%")
    out.print(t)

    lo = res["loader"]
    t = Table(title="Is data loading the bottleneck?")
    t.add_column("measure")
    t.add_column("img/s", justify="right")
    t.add_column("over project training", justify="right")
    t.add_row("project data path alone ("
              + ("held on the device" if lo["project_data_on_device"] else
                 "DataLoader + device transfer") + ")",
              _f(lo["project_loader_images_per_s"], "{:.0f}"), _f(lo["loader_over_train"],
                                                                  "{:.1f}x"))
    t.add_row("the other data path (" + ("DataLoader + device transfer"
              if lo["project_data_on_device"] else "held on the device") + ")",
              _f(lo["other_data_path_images_per_s"], "{:.0f}"),
              _f(lo["other_data_path_images_per_s"] / tr["project"]["images_per_s"],
                 "{:.1f}x"))
    t.add_row("+ normalization + device augmentation",
              _f(lo["input_pipeline_images_per_s"], "{:.0f}"),
              _f(lo["input_pipeline_over_train"], "{:.1f}x"))
    t.add_row(f"baseline loader alone ({res['settings']['workers']} workers)",
              _f(lo["baseline_loader_images_per_s"], "{:.0f}"),
              _f(lo["baseline_loader_over_train"], "{:.1f}x"))
    t.add_row("project training", _f(tr["project"]["images_per_s"], "{:.1f}"), "1.0x")
    out.print(t)

    inf = res["inference"]
    t = Table(title=f"Inference ({inf['precision']}, {inf['memory_format']}, eval mode)")
    for c in ("batch", "variant", "median ms", "img/s", "vs eager"):
        t.add_column(c, justify="left" if c == "variant" else "right")
    for b in res["settings"]["infer_batches"]:
        for name, r in inf[f"batch_{b}"].items():
            t.add_row(str(b), name, _f(r["median_latency_ms"]), _f(r["images_per_s"], "{:.1f}"),
                      _f(r["over_eager"], "{:.2f}x"))
    out.print(t)
    if inf["compile"]["status"] != "ok":
        out.print(f"torch.compile: unavailable ({inf['compile']['reason']})")
    else:
        out.print("torch.compile runs in its own process; its 'vs eager' is against eager timed "
                  "in that process. Compile time: " + ", ".join(
                      f"batch {b} {r['compile_seconds']:.0f} s"
                      for b, r in inf["compile"]["by_batch"].items()), highlight=False)
    out.print(f"TorchScript: {inf['torchscript']}; optimized: {inf['torchscript_optimized']}",
              highlight=False)

    sc = res["scaling"]
    if sc.get("status") == "ok":
        t = Table(title=f"Data-parallel scaling ({sc['backend']}, batch "
                        f"{sc['per_process_batch']}/process; {sc['note']})")
        for c in ("processes", "global batch", "threads/process", "img/s", "speedup",
                  "efficiency"):
            t.add_column(c, justify="right")
        for r in sc["runs"]:
            t.add_row(str(r["processes"]), str(r["global_batch"]),
                      str(r["threads_per_process"]), _f(r["images_per_s"], "{:.1f}"),
                      _f(r["speedup_vs_1"], "{:.2f}x"), _f(r["efficiency"], "{:.0%}"))
        out.print(t)
    else:
        out.print(f"scaling: {sc.get('status')} ({sc.get('reason', '')})")

    sm = res["summary"]
    t = Table(title="Key ratios (same run)", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    t.add_row("project training speedup vs baseline",
              _f(sm["project_speedup_vs_baseline"], "{:.2f}x"))
    t.add_row("gain from device augmentation (vs per-sample CPU workers)",
              _f(sm["device_augment_gain"], "{:.2f}x"))
    t.add_row("gain from channels-last", _f(sm["channels_last_gain"], "{:.2f}x"))
    t.add_row("other data path (device-resident vs DataLoader), vs project",
              _f(sm["data_toggled_ratio_vs_project"], "{:.2f}x"))
    t.add_row("gain from the sync-free step (vs item() + finite check per step)",
              _f(sm["sync_free_gain"], "{:.2f}x"))
    t.add_row(f"project vs the best baseline ({sm['best_baseline_workers']} workers)",
              _f(sm["project_speedup_vs_best_baseline"], "{:.2f}x"))
    t.add_row("project vs the baseline's sustained rate (the lesser of its steps and its "
              "loader alone)", _f(sm["project_speedup_vs_sustained_baseline"], "{:.2f}x"))
    t.add_row("augmentation share of the project step", _f(sm["augment_share_of_step"],
                                                            "{:.1%}"))
    for name, r in sm["round_medians"].items():
        t.add_row(f"median over rounds: {name}", _f(r, "{:.2f}x"))
    for name, r in sm["round_medians_cpu_time"].items():
        t.add_row(f"median over rounds, CPU seconds: {name}", _f(r, "{:.2f}x"))
    t.add_row(f"AMP switched to {sm['amp_toggled_to']}, vs project",
              _f(sm["amp_toggled_ratio_vs_project"], "{:.2f}x"))
    t.add_row(f"Adam switched to {sm['adam_toggled_to']}, vs project",
              _f(sm["adam_toggled_ratio_vs_project"], "{:.2f}x"))
    t.add_row("loader over training (>= 3: loading is not the bottleneck)",
              _f(sm["loader_over_train"], "{:.0f}x"))
    for b, r in sm["torchscript_over_eager"].items():
        t.add_row(f"TorchScript over eager, batch {b}", _f(r, "{:.2f}x"))
    if "scaling" in sm:
        t.add_row(f"{sm['scaling']['processes']} processes over 1",
                  _f(sm["scaling"]["speedup_vs_1"], "{:.2f}x"))
    slower = sm["project_defaults_slower_than_alternative"]
    t.add_row("project defaults slower than switching them off", ", ".join(slower) or "none")
    out.print(t)

"""Scaling benchmark, part 3: the report. One result dict (settings, machine, measured and
projected rows) written as NAME.json, NAME.md (a Markdown table with how each column was
measured) and NAME.png (scaling_plot.py), and logged to W&B as one run.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from benchmarks import machine_info, scaling_plot
from distres.host import available_cpus

COLUMNS = (
    "config",
    "kind",
    "processes",
    "images/s",
    "images/s per rank",
    "step ms",
    "data wait ms",
    "compute ms",
    "exposed comm ms",
    "efficiency",
    "x CPU",
    "peak mem MB",
    "compute ms for 90%",
)


def machine() -> dict:
    import torch

    return {
        "cpu": machine_info.cpu_model(),
        "cores": available_cpus(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "code": machine_info.code_version(),
    }


def build_result(a, cfg, argv: list[str], rows: list[dict], projection: tuple[dict, list[dict]], secs: float) -> dict:
    """Everything the report shows, and what is needed to read it again (--render)."""
    settings = {
        "arch": a.arch,
        "batch_size": a.batch_size,
        "amp": a.amp,
        "data": a.data,
        "image_size": cfg.data.train_image_size,
        "window": a.window,
        "warmup_windows": a.warmup_windows,
        "windows": a.windows,
        "train_args": a.train_args,
    }
    return {
        "command": "python benchmarks/scaling.py " + " ".join(argv),
        "machine": machine(),
        "settings": settings,
        "measured": rows,
        "projection": projection[0],
        "projected": projection[1],
        "seconds": round(secs, 1),
    }


def _f(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _measured_cells(r: dict) -> list:
    return [
        r["label"],
        "measured",
        r["world"],
        _f(r["images_per_sec"], ".1f"),
        _f(r["images_per_sec_per_rank"], ".1f"),
        _f(r["step_ms"], ".1f"),
        _f(r["data_wait_ms"], ".1f"),
        _f(r["compute_ms"], ".1f"),
        _f(r["exposed_comm_ms"], ".1f") if r["world"] > 1 else "-",
        _f(r["efficiency"], ".2f"),
        _f(r["x_cpu"], ".2f"),
        _f(r["peak_mem_mb"], ".0f"),
        "",
    ]


def _projected_cells(p: dict) -> list:
    return [
        p["name"],
        "projected",
        p["units"],
        _f(p["images_per_sec"], ".1f"),
        _f(p["images_per_sec"] / p["units"], ".1f"),
        _f(p["compute_ms"] + p["exposed_comm_ms"], ".1f"),
        "",
        _f(p["compute_ms"], ".1f"),
        _f(p["exposed_comm_ms"], ".1f"),
        _f(p["efficiency"], ".2f"),
        "",
        "",
        _f(p["compute_ms_for_90pct"], ".1f"),
    ]


def table_rows(result: dict) -> list[list]:
    """The table's cells, one list per row in COLUMNS order: measured rows, then projected."""
    return [_measured_cells(r) for r in result["measured"]] + [_projected_cells(p) for p in result["projected"]]


def _measured_notes(result: dict) -> str:
    s, meas = result["settings"], result["measured"]
    deltas = ", ".join(f"{r['name']} {r['comm_delta_ms']:.1f} ms" for r in meas if r["comm_delta_ms"] is not None)
    loads = ", ".join(f"{r['name']} {r['load_avg_1min'][0]:.1f} -> {r['load_avg_1min'][1]:.1f}" for r in meas)
    return (
        f"Measured: median over {s['windows']} logged windows of {s['window']} steps after "
        f"{s['warmup_windows']} warm-up windows (start-up and compilation excluded). Images/s per rank "
        "= total / processes. Efficiency = throughput per unit of hardware / the 1-process run's: per "
        "core against cpu1 for CPU rows (both CPU runs use all cores, so it is cpuN / cpu1), per GPU "
        "against gpu1 for GPU rows. x CPU = total / the fastest CPU row. "
        "Compute = step time - data wait - exposed communication. Exposed communication = step time "
        "in windows with the gradient all-reduce minus that in interleaved windows "
        "without it (DDP no_sync, `--bench-comm-probe`); the raw differences were "
        + (deltas or "not measured (no N > 1 run)")
        + ". Peak memory: max GPU memory allocated on CUDA, peak resident set of rank 0 on CPU. "
        "1-minute load average before and after each run (other work on the machine slows CPU runs): " + loads + "."
    )


def _projection_notes(p: dict) -> list[str]:
    lines = [
        f"Projected (not measured): ring all-reduce of {p['gradient_bytes'] / 1e6:.1f} MB of fp32 "
        f"gradients in {p['buckets']} buckets ({p['bucket_cap_mb']:g} MB), overlapped with backward "
        f"(2/3 of compute), from the {p['basis']}; benchmarks/allreduce_model.py. "
        "'compute ms for 90%': the shortest compute time per step that keeps 90% efficiency on that "
        "link and GPU count; a faster GPU is communication-bound there. Links:",
    ]
    return lines + [
        f"- {k['name']}: {k['bandwidth_gbs']:g} GB/s, {k['latency_us']:g} us per ring step ({k['basis']})"
        for k in p["links"]
    ]


def render_markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    gpus = ", GPUs: " + ", ".join(m["gpus"]) if m["gpus"] else ", no GPU"
    lines = [
        f"# Scaling benchmark: {s['arch']}, {s['data']} {s['image_size'] or ''}px, batch {s['batch_size']} "
        f"per process, amp {s['amp']}",
        "",
        f"Device: {m['cpu']} ({m['cores']} cores){gpus}; torch {m['torch']}, Python {m['python']}; {m['code']}.",
        f"Command: `{result['command']}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table_rows(result)]
    lines += ["", _measured_notes(result)]
    if result.get("projection"):
        lines += ["", *_projection_notes(result["projection"])]
    return "\n".join(lines) + "\n"


def write_partial(rows: list[dict], out: Path, name: str) -> None:
    """The runs finished so far, on disk at once: a later run that fails or times out loses nothing."""
    (out / f"{name}.json").write_text(json.dumps({"partial": True, "measured": rows}, indent=2) + "\n")


def write_outputs(result: dict, out: Path, name: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(render_markdown(result))
    try:
        scaling_plot.render_plot(result, paths["png"])
    except ImportError as e:  # matplotlib: the figures are in the JSON and Markdown already
        print(f"scaling: no plot ({e})", file=sys.stderr)
        del paths["png"]
    return paths


def log_wandb(result: dict, paths: dict, a, work: Path) -> str | None:
    """One W&B run for the whole benchmark: config, a table, the plot. Returns its run dir."""
    from distres import tracking

    config = {
        "settings": result["settings"],
        "machine": result["machine"],
        "units": [r["name"] for r in result["measured"]],
    }
    run = tracking.open_wandb_run(a.wandb, work, config, a.name, resume=False, job_type="scaling")
    if run is None:
        return None
    try:
        import wandb

        cells = [[str(c) for c in row] for row in table_rows(result)]
        run.log(
            {
                "scaling/table": wandb.Table(columns=list(COLUMNS), data=cells),
                "scaling/plot": wandb.Image(str(paths["png"])),
            }
        )
        for r in result["measured"]:
            run.summary[f"{r['name']}/images_per_sec"] = r["images_per_sec"]
            if r["efficiency"] is not None:
                run.summary[f"{r['name']}/efficiency"] = r["efficiency"]
        run.save(str(paths["json"]), base_path=str(paths["json"].parent), policy="now")
        return str(Path(run.dir).parent)
    except Exception as e:  # W&B trouble never loses the results already written
        print(f"scaling: W&B logging failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    finally:
        run.finish()

"""Scaling benchmark, part 2: figures from the runs' metrics records. Pure functions but for
gradient_param_bytes, which builds the model once to count its gradients.

Per run: steady-state images/s (the median over logged windows after the warm-up ones, so
start-up and torch.compile are excluded), the step-time breakdown (data wait, compute, exposed
communication), peak memory. Across runs: efficiency per unit of hardware against the 1-unit
run of the same kind. Beyond them: projected rows for other links (allreduce_model.py).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks import allreduce_model
from distres.errors import UserError


def steady_windows(records: list[dict], window: int, warmup: int) -> list[dict]:
    """The training windows that measure the steady state: after the warm-up ones, of full
    length (the last window of an epoch may be short) and not the first after an epoch end
    (the loader restarts there)."""
    train = [r for r in records if r["kind"] == "train"]
    clean, prev = [], {"step": 0, "epoch": 0.0}
    for i, r in enumerate(train):
        after_epoch_end = prev["epoch"] > 0 and float(prev["epoch"]).is_integer()
        if i >= warmup and r["step"] - prev["step"] == window and not after_epoch_end:
            clean.append(r)
        prev = r
    return clean


def analyse(records: list[dict], window: int, warmup: int) -> dict:
    """Steady-state figures from one run's metrics records.

    Exposed communication comes from --bench-comm-probe: windows tagged synced=False ran under
    DDP no_sync, so the step time they save is what the all-reduce adds (the part of it that
    backward does not hide)."""
    train = [r for r in records if r["kind"] == "train"]
    clean = steady_windows(records, window, warmup)
    synced = [r for r in clean if r.get("synced", True)]
    unsynced = [r for r in clean if r.get("synced") is False]
    if not synced:
        raise UserError(f"no steady-state window in {len(train)} logged windows; raise --windows")
    step_time = statistics.median(r["step_time"] for r in synced)
    wait = statistics.median(r["step_time"] * r["data_wait_frac"] for r in synced)
    comm_raw = None
    if unsynced:  # whole step times: on a GPU the host clock only sees a step as a whole
        comm_raw = step_time - statistics.median(r["step_time"] for r in unsynced)
    exposed = max(0.0, comm_raw or 0.0)
    return {
        "images_per_sec": statistics.median(r["images_per_sec"] for r in synced),
        "step_ms": 1e3 * step_time,
        "data_wait_ms": 1e3 * wait,
        "compute_ms": 1e3 * max(0.0, step_time - wait - exposed),
        "exposed_comm_ms": 1e3 * exposed,
        "comm_delta_ms": None if comm_raw is None else 1e3 * comm_raw,
        "nosync_images_per_sec": statistics.median(r["images_per_sec"] for r in unsynced) if unsynced else None,
        "peak_mem_mb": max(r.get("peak_mem_mb", 0.0) for r in train),
        "windows": len(synced),
        "nosync_windows": len(unsynced),
        "window_images_per_sec": [round(r["images_per_sec"], 1) for r in synced],
    }


def unit_row(unit, info: dict, records: list[dict], window: int, warmup: int) -> dict:
    """One measured row: what ran (a scaling_run.Unit), how long, and its figures."""
    described = {
        "name": unit.name,
        "label": unit.label,
        "device": unit.device,
        "world": unit.world,
        "nnodes": unit.nnodes,
        "hardware": unit.hardware,
        "ref": unit.ref,
    }
    return {**described, **info, **analyse(records, window, warmup)}


def with_efficiency(rows: list[dict]) -> list[dict]:
    """Efficiency = throughput per unit of hardware (core or GPU) / the 1-process run's;
    x_cpu = total / the best CPU total."""
    by_name = {r["name"]: r for r in rows}
    best_cpu = max((r["images_per_sec"] for r in rows if r["device"] == "cpu"), default=None)
    for r in rows:
        ref = by_name.get(r["ref"])
        r["images_per_sec_per_rank"] = r["images_per_sec"] / r["world"]
        r["efficiency"] = (
            (r["images_per_sec"] / r["hardware"]) / (ref["images_per_sec"] / ref["hardware"]) if ref else None
        )
        r["x_cpu"] = r["images_per_sec"] / best_cpu if best_cpu else None
    return rows


def gradient_param_bytes(cfg) -> list[int]:
    """fp32 gradient bytes per parameter of the runs' model, in registration order (DDP
    all-reduces fp32 gradients whatever the autocast dtype)."""
    from distres import models

    if cfg.data.dataset == "synthetic":
        classes = cfg.synthetic_classes
    elif cfg.data.dataset == "cifar10":
        classes = 10
    else:
        classes = sum(d.is_dir() for d in (Path(cfg.data_dir) / "train").iterdir())
    net = models.build_model(cfg.arch, classes, models.use_cifar_stem(cfg.cifar_stem, cfg.data.train_image_size))
    return [p.numel() * 4 for p in net.parameters() if p.requires_grad]


def projections(rows: list[dict], a, cfg) -> tuple[dict, list[dict]]:
    """Projected rows from the runs' model and DDP bucket size (cfg: the runs' distres config),
    with the compute time of --project-compute-ms or else of the measured 1-unit run."""
    param_bytes = gradient_param_bytes(cfg)
    buckets = allreduce_model.bucket_sizes(param_bytes, cfg.bucket_cap_mb)
    by_name = {r["name"]: r for r in rows}
    base = by_name.get("gpu1") or by_name.get("cpu1")
    if a.project_compute_ms:
        compute_s, per_unit = a.project_compute_ms / 1e3, a.batch_size / (a.project_compute_ms / 1e3)
        basis = f"--project-compute-ms {a.project_compute_ms:g} (stated, not measured)"
    elif base is not None:
        compute_s, per_unit = base["compute_ms"] / 1e3, base["images_per_sec_per_rank"]
        basis = f"compute time of the measured {base['name']} run ({base['compute_ms']:.1f} ms/step)"
    else:
        return {}, []
    info = {
        "gradient_bytes": sum(param_bytes),
        "buckets": len(buckets),
        "bucket_cap_mb": cfg.bucket_cap_mb,
        "compute_ms": 1e3 * compute_s,
        "basis": basis,
        "links": [
            {"name": k.name, "bandwidth_gbs": k.bandwidth_gbs, "latency_us": k.latency_us, "basis": k.basis}
            for k in allreduce_model.LINKS
        ],
    }
    return info, allreduce_model.project(compute_s, per_unit, buckets)

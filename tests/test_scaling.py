"""benchmarks/scaling.py: the real --quick run on the CPU, its analysis and the projection model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import allreduce_model as model
from benchmarks import scaling, scaling_analyse, scaling_run
from distres.errors import UserError
from tests.helpers import REPO, cli_env


def test_quick_cpu_run(tmp_path, monkeypatch):
    """The README's --quick, run from a folder outside the checkout: the default work folder
    runs/scaling-TIME is written there, and the runs read their relative --output-dir from there
    too (as they would a relative --data-dir)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no W&B key or file from the machine
    monkeypatch.delenv("WANDB_MODE", raising=False)
    # The README's --quick with one warm-up window instead of two, two measured windows instead of
    # six, windows of 3 steps of 16 images and the cheap stem: the same runs, shorter.
    # fp32: on a CPU without native bf16 (AVX2 only) bf16 autocast is ~20x slower than fp32.
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "scaling.py"),
            "--quick",
            "--warmup-windows",
            "1",
            "--windows",
            "2",
            "--window",
            "3",
            "--batch-size",
            "16",
            "--amp",
            "none",
            "--name",
            "quick",
            "--wandb",
            "offline",
            "--",
            "--cifar-stem",
            "off",  # the ImageNet stem: a sixteenth of the CIFAR stem's compute at 32 px
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    [work] = (tmp_path / "runs").glob("scaling-*")
    rel = f"runs/{work.name}"
    wrote = f"scaling: wrote {rel}/quick.json, {rel}/quick.md, {rel}/quick.png; W&B run in {rel}/wandb/offline-run-"
    assert r.stderr.strip().splitlines()[-1].startswith(wrote)
    assert (work / "cpu1" / "metrics.jsonl").is_file() and (work / "cpuN" / "metrics.jsonl").is_file()
    res = json.loads((work / "quick.json").read_text())
    assert (work / "quick.png").stat().st_size > 10_000
    rows = {m["name"]: m for m in res["measured"]}
    assert set(rows) == {"cpu1", "cpuN"}
    one, two = rows["cpu1"], rows["cpuN"]
    assert one["world"] == 1 and two["world"] == 2 and one["windows"] == two["windows"] == 2
    assert two["nosync_windows"] == 2 and two["comm_delta_ms"] is not None
    for m in (one, two):
        assert m["images_per_sec"] > 0 and m["peak_mem_mb"] > 100
        assert m["step_ms"] == pytest.approx(m["data_wait_ms"] + m["compute_ms"] + m["exposed_comm_ms"])
    # efficiency from the two measured totals (both runs use the same cores)
    assert one["efficiency"] == 1.0
    assert two["efficiency"] == pytest.approx(two["images_per_sec"] / one["images_per_sec"])
    assert two["images_per_sec_per_rank"] == pytest.approx(two["images_per_sec"] / 2)

    md = (work / "quick.md").read_text()
    assert "| CPU, 2 processes (gloo)" in md and "torch 2." in md
    assert "working tree on top of " in md or "; commit " in md
    projected = [line for line in md.splitlines() if "| projected |" in line]
    assert len(projected) == len(res["projected"]) == sum(len(k.sizes) for k in model.LINKS)
    assert {p["link"] for p in res["projected"]} == {"NVLink", "PCIe", "InfiniBand"}
    # one W&B run holding the table and the plot
    runs = list((work / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    summary = json.loads(
        subprocess.run(
            [str(Path(sys.executable).with_name("wandb")), "leet", "inspect", "--summary", "--json", str(runs[0])],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
    )
    assert summary["summary"]["scaling/table"]["_type"] == "table-file"
    assert summary["summary"]["scaling/plot"]["_type"] == "image-file"
    assert summary["summary"]["cpuN/efficiency"] == pytest.approx(two["efficiency"])


def test_odd_warmup_is_honoured(capsys):
    """--warmup-windows 3 runs 3 warm-up windows: an N > 1 run still measures as many synced as
    no_sync windows (they alternate, and it runs 2 x --windows after the warm-up)."""
    args = ["--units", "cpu1,cpuN", "--warmup-windows", "3", "--windows", "2", "--window", "5", "--dry-run"]
    assert scaling.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = {ln.split(":")[0]: int(ln.split("--max-steps ")[1].split()[0]) for ln in lines}
    assert steps == {"cpu1": (3 + 2) * 5, "cpuN": (3 + 2 * 2) * 5}
    # the cpuN run's windows as the probe tags them: window k skips the all-reduce when k is odd
    recs = [_rec(5 * (k + 1), 100.0, 0.0, 1.0, synced=k % 2 == 0) for k in range(3 + 2 * 2)]
    got = scaling_analyse.analyse(recs, window=5, warmup=3)
    assert (got["windows"], got["nosync_windows"]) == (2, 2)


def _rec(step, ips, wait, step_time, synced=None, epoch=0.5):
    r = {
        "kind": "train",
        "step": step,
        "epoch": epoch,
        "images_per_sec": ips,
        "data_wait_frac": wait,
        "step_time": step_time,
        "peak_mem_mb": 100.0 + step,
    }
    if synced is not None:
        r["synced"] = synced
    return r


def test_analyse_measures_exposed_communication():
    recs = [
        _rec(5, 1.0, 0.0, 9.0, True),
        _rec(10, 1.0, 0.0, 9.0, False),  # warm-up
        _rec(15, 100.0, 0.1, 1.0, True),
        _rec(20, 120.0, 0.1, 0.8, False),
        _rec(25, 110.0, 0.1, 1.2, True),
        _rec(30, 130.0, 0.1, 0.9, False),
        {"kind": "eval", "step": 30, "epoch": 1},
    ]
    got = scaling_analyse.analyse(recs, window=5, warmup=2)
    assert got["windows"] == 2 and got["nosync_windows"] == 2
    assert got["images_per_sec"] == 105.0 and got["step_ms"] == pytest.approx(1100)
    assert got["data_wait_ms"] == pytest.approx(110)
    # whole step times: synced median 1.1 s, unsynced median 0.85 s
    assert got["exposed_comm_ms"] == pytest.approx(250)
    assert got["compute_ms"] == pytest.approx(1100 - 110 - 250)
    assert got["peak_mem_mb"] == 130.0


def test_analyse_drops_short_windows_and_loader_restarts():
    recs = [
        _rec(4, 1.0, 0, 1.0),
        _rec(8, 50.0, 0, 1.0),
        _rec(10, 1.0, 0, 1.0, epoch=1.0),  # epoch end: short
        _rec(14, 2.0, 0.5, 1.0, epoch=1.4),  # first window after an epoch end: loader start-up
        _rec(18, 60.0, 0, 1.0, epoch=1.8),
    ]
    got = scaling_analyse.analyse(recs, window=4, warmup=1)
    assert got["window_images_per_sec"] == [50.0, 60.0] and got["exposed_comm_ms"] == 0.0
    with pytest.raises(UserError, match="no steady-state window"):
        scaling_analyse.analyse(recs[:1], window=4, warmup=1)


def test_efficiency_is_per_unit_of_hardware():
    rows = [
        {"name": "cpu1", "device": "cpu", "world": 1, "hardware": 2, "ref": "cpu1", "images_per_sec": 100.0},
        {"name": "cpuN", "device": "cpu", "world": 2, "hardware": 2, "ref": "cpu1", "images_per_sec": 80.0},
        {"name": "gpu1", "device": "cuda", "world": 1, "hardware": 1, "ref": "gpu1", "images_per_sec": 3000.0},
        {"name": "gpuN", "device": "cuda", "world": 8, "hardware": 8, "ref": "gpu1", "images_per_sec": 21000.0},
    ]
    got = {r["name"]: r for r in scaling_analyse.with_efficiency(rows)}
    assert got["cpuN"]["efficiency"] == pytest.approx(0.8)
    assert got["gpuN"]["efficiency"] == pytest.approx(0.875)
    assert got["gpu1"]["x_cpu"] == pytest.approx(30.0)
    assert got["gpuN"]["images_per_sec_per_rank"] == 2625.0


def test_ring_allreduce_and_buckets():
    # 2 GPUs, 1 GB at 100 GB/s: each GPU sends and receives 2 (N-1)/N = 1 x the bytes
    assert model.ring_allreduce_s(1e9, 2, 100.0, 0.0) == pytest.approx(0.01)
    assert model.ring_allreduce_s(1e9, 8, 100.0, 0.0) == pytest.approx(0.0175)
    assert model.ring_allreduce_s(1e9, 1, 100.0, 5.0) == 0.0
    params = [4 * 10**6] * 10 + [4000] * 5  # registration order; backward starts at the end
    buckets = model.bucket_sizes(params, bucket_cap_mb=10)
    assert sum(buckets) == sum(params)
    assert buckets[0] == 5 * 4000 + 4 * 10**6  # the 1 MiB first bucket closes once over 1 MiB
    assert all(b >= 10 * 2**20 for b in buckets[1:-1])


def test_projection_overlap_and_limits():
    buckets = model.bucket_sizes([4 * 10**6] * 25, 25)  # 100 MB, like ResNet-50
    nvlink, pcie = model.LINKS[0], model.LINKS[1]
    # a slow GPU hides the whole all-reduce behind backward; only the last bucket's tail shows
    assert model.efficiency(10.0, buckets, 8, pcie) > 0.99
    # a fast GPU on PCIe is communication-bound; NVLink keeps it efficient
    assert model.efficiency(0.005, buckets, 8, pcie) < 0.5 < 0.95 < model.efficiency(0.005, buckets, 8, nvlink)
    need = model.compute_for_efficiency(0.9, buckets, 8, pcie)
    assert model.efficiency(need, buckets, 8, pcie) == pytest.approx(0.9, abs=1e-3)
    rows = model.project(0.1, 500.0, buckets)
    assert [r["units"] for r in rows if r["link"] == "PCIe"] == [2, 4, 8]
    pcie_eff = [r["efficiency"] for r in rows if r["link"] == "PCIe"]
    assert pcie_eff == sorted(pcie_eff, reverse=True)  # more GPUs, more bytes per GPU on the ring


def test_bad_input_is_one_line(capsys):
    assert scaling.main(["--units", "cpu1,tpu9"]) == 2
    assert capsys.readouterr().err.strip() == (
        "distres: error: unknown unit 'tpu9' in --units; choose from cpu1, cpuN, gpu1, gpuN, nodes or auto"
    )
    assert scaling.main(["--units", "gpu1", "--gpus", "0"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert scaling.main(["--windows", "0"]) == 2
    assert capsys.readouterr().err.strip() == "distres: error: --windows must be >= 1"
    assert scaling.main(["--units", "gpuN", "--gpus", "1", "--dry-run"]) == 2  # skipped: nothing left
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "distres: error: --units gpuN leaves no run to measure (gpuN alone is skipped with one GPU)"
    )


def test_comm_probe_skips_the_allreduce_every_other_window(tmp_path):
    """The measurement behind 'exposed communication': real DDP on a one-rank gloo group with the
    probe installed as its comm hook by models.parallelize, the all-reduces it starts counted."""
    import torch
    import torch.distributed as tdist
    import torch.nn as nn

    from distres import models, perf
    from distres.config import TrainConfig, build_parser
    from distres.dist import DistContext

    assert "--bench-comm-probe" in build_parser().format_help()
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ctx = DistContext(0, 0, 1, 1, torch.device("cpu"), "gloo")
        cfg = TrainConfig(log_every=2, bench_comm_probe=True, channels_last=False)
        meter = perf.StepMeter(cfg, ctx, global_batch=8, backend="synthetic")
        calls, allreduce = [], meter.probe.allreduce

        def counted(group, bucket):
            calls.append(1)
            return allreduce(group, bucket)

        meter.probe.allreduce = counted
        ddp = models.parallelize(nn.Linear(4, 2), cfg, ctx, comm_probe=meter.probe)
        synced = []
        for step in range(8):
            if step % 2 == 0:
                meter.start_window(step)  # as a flush at every --log-every steps does
            before = len(calls)
            ddp(torch.randn(8, 4)).sum().backward()
            synced.append(len(calls) > before)
        assert synced == [True, True, False, False, True, True, False, False]
        assert meter.window(2, 1.0, 0.1, step=2)["synced"] is True
        assert meter.window(2, 1.0, 0.1, step=4)["synced"] is False
        plain = perf.StepMeter(TrainConfig(log_every=2), ctx, global_batch=8, backend="synthetic")
        assert plain.probe is None and "synced" not in plain.window(2, 1.0, 0.1, step=4)  # every step all-reduces
    finally:
        tdist.destroy_process_group()


def test_multinode_command_is_one_torchrun_per_node(tmp_path):
    a = scaling.parse_args(["--quick"])
    slurm = scaling_run.Slurm(nnodes=2, job_id="42", head="node-a", cpus_per_node=16)
    [unit] = scaling_run.plan(["nodes"], cpu_procs=2, gpus=4, slurm=slurm)
    assert (unit.world, unit.hardware, unit.ref) == (8, 8, "gpu1")
    cmd = scaling_run.command(a, unit, tmp_path, slurm)
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=16"]
    assert "--nnodes=2" in cmd and "--nproc_per_node=4" in cmd and "--standalone" not in cmd
    assert "--rdzv-endpoint=node-a:29511" in cmd and "--bench-comm-probe" in cmd
    assert cmd[cmd.index("--device") + 1] == "cuda"


def test_gpu_kit_lists_parts_that_fit_the_command_limit():
    """benchmarks/gpu.sh list runs nothing: every part with its minutes (each within a 10-minute
    command, with room to start and pack), and an unknown part is refused."""
    import re

    out = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "list"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    parts = re.findall(r"^(\S+)\s+~(\d+) min\s+\S", out.stdout, re.M)
    assert {p for p, _ in parts} >= {"first", "smoke", "bare", "levers", "loaders", "cifar10", "scaling", "seed"}
    assert all(1 <= int(m) <= 8 for _, m in parts), parts
    bad = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "nope"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2 and "unknown part" in bad.stderr

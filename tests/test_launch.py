import os
import subprocess
import sys

from tests.helpers import REPO, TINY, free_port, make_imagefolder, read_metrics


def test_local_launcher_runs_two_cpu_ranks_from_the_callers_folder(tmp_path):
    """Relative --data-dir and --output-dir mean what they say from the folder the user is in,
    not from the checkout the script lives in."""
    env = dict(os.environ, NPROC="2", PYTHON=sys.executable)  # the interpreter running the tests
    make_imagefolder(tmp_path / "data" / "c10", {"train": {"a": 12, "b": 12}, "val": {"a": 2, "b": 2}})
    r = subprocess.run(
        [
            str(REPO / "launch" / "local.sh"),
            *TINY,
            "--data",
            "imagefolder",
            "--data-dir",
            "data/c10",
            "--workers",
            "0",
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--output-dir",
            "runs/x",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 x cpu (gloo)" in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("outputs in runs/x")
    assert [x["step"] for x in read_metrics(tmp_path / "runs" / "x") if x["kind"] == "train"] == [1, 2, 3]


def test_multinode_launcher_joins_two_nodes_by_rendezvous(tmp_path):
    """Two "nodes" on this machine, each one torchrun agent with one process: the c10d
    rendezvous assigns the node ranks, as on a real cluster."""
    port = free_port()
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        NNODES="2",
        NPROC_PER_NODE="1",
        RUN_ID=f"test-{port}",
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
    )
    cmd = [
        str(REPO / "launch" / "multinode.sh"),
        *TINY,
        "--batch-size",
        "4",
        "--synthetic-samples",
        "32",
        "--max-steps",
        "3",
        "--threads",
        "1",  # each "node" would take all the cores of the machine the two share
        "--output-dir",
        "runs/x",  # relative: from the folder each node's command runs in
    ]
    nodes = [
        subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(logs)[-3000:]
    assert any("2 x cpu (gloo)" in log for log in logs)
    assert [x["step"] for x in read_metrics(tmp_path / "runs" / "x") if x["kind"] == "train"] == [1, 2, 3]


def test_threads_of_each_process_stay_within_slurms_allotment():
    """A SLURM task gets --cpus-per-task CPUs even where SLURM does not bind it to them
    (TaskPlugin=task/none): its ranks share those, not the node's mask."""
    from distres.host import available_cpus

    mask = len(os.sched_getaffinity(0))
    assert available_cpus({}) == mask
    assert available_cpus({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1"}) == 1
    assert available_cpus({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": str(mask + 8)}) == mask  # never over the mask
    assert available_cpus({"SLURM_CPUS_PER_TASK": "1"}) == mask  # a variable left over outside any job


def test_gpu_of_each_process():
    """torchrun: local rank r trains on cuda:r. srun --gpus-per-task=1 without torchrun: SLURM
    shows each task only its own GPU, as cuda:0, whatever its SLURM_LOCALID. Too few GPUs
    otherwise is an error that says how many processes fit."""
    import pytest

    from distres.dist import gpu_index
    from distres.errors import RankError

    torchrun = {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8"}
    srun = {"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NTASKS": "8"}
    assert gpu_index(3, 8, torchrun) == 3
    assert gpu_index(3, 1, srun) == 0
    assert gpu_index(3, 8, srun) == 3
    with pytest.raises(RankError, match="launch at most 1 processes per node"):
        gpu_index(3, 1, torchrun)  # 8 processes on one visible GPU: not silently shared
    with pytest.raises(RankError, match="only 2 visible"):
        gpu_index(3, 2, srun)

"""slurm/train-cpu.sbatch on a real one-node SLURM cluster (slurm/local-cluster.sh): a 2-task job
runs the multi-node path (two torchrun agents meeting in a c10d rendezvous) and, signalled like
a preemption, checkpoints, requeues itself and finishes with the same steps (one job for both:
each costs SLURM's start-up and requeue delays)."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REPO, TINY, read_metrics, wait_for

CLUSTER = REPO / "slurm" / "local-cluster.sh"

pytestmark = pytest.mark.slow  # a real SLURM job, requeued: minutes


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root")
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(b)]
    if missing:
        pytest.skip(f"SLURM not installed ({', '.join(missing)} missing; tools/system-deps.sh installs them)")
    env = dict(os.environ)  # the script's default folder, so that a cluster already up is found
    was_up = subprocess.run([CLUSTER, "status"], env=env, capture_output=True).returncode == 0
    r = subprocess.run([CLUSTER, "start"], env=env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.skip(f"SLURM could not start: {r.stderr.strip()[-500:]}")
    env["SLURM_CONF"] = r.stdout.strip().split("=", 1)[1]
    # The job runs this interpreter, and in this checkout, whatever the submit directory.
    env.update(PYTHON=sys.executable, DISTRES_HOME=str(REPO), OMP_NUM_THREADS="1")
    yield env
    if not was_up:
        subprocess.run([CLUSTER, "stop"], env=env, capture_output=True, timeout=60)


def _submit(env, out, log, args) -> str:
    r = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--ntasks=2",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            f"--output={log}",
            str(REPO / "slurm" / "train-cpu.sbatch"),
            *args,
        ],
        cwd=REPO,
        env=dict(env, OUTPUT_DIR=str(out)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def _job(env, job_id) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", text))


def _finished(env, job_id):
    state = _job(env, job_id).get("JobState")
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None


def _last_step(out) -> int:
    try:
        return max(x["step"] for x in read_metrics(out) if x["kind"] == "train")
    except (FileNotFoundError, ValueError):
        return 0


JOB_ARGS = TINY + ["--batch-size", "4", "--eval-every", "0"]


def test_preempted_two_task_job_checkpoints_requeues_and_finishes_the_same_steps(slurm, tmp_path):
    """A 2-task job (two torchrun agents meeting in the c10d rendezvous: the multi-node path)
    trains across the rendezvous, is signalled like a preemption, checkpoints, requeues itself
    and finishes with every step once."""
    out, log = tmp_path / "run", tmp_path / "job.log"
    steps = 32  # 128 samples / (2 ranks x 4) per epoch, 2 epochs
    job = _submit(slurm, out, log, JOB_ARGS + ["--synthetic-samples", "128", "--epochs", "2"])
    wait_for(lambda: _last_step(out) >= 5, 240, "step 5 of the job", poll=0.2)
    # what SLURM does ahead of the time limit with --signal=B:USR1@...: signal the batch shell
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
    state = wait_for(lambda: _finished(slurm, job), 400, f"job {job} to finish after its requeue", poll=1)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]
    assert "2 x cpu (gloo)" in text  # one process from each of the two torchrun agents
    assert _job(slurm, job)["Restarts"] == "1"
    assert "requeueing" in text
    # torchrun itself took the signal and passed it on (rather than dying of it)
    assert re.search(r"Received (Signals\.SIGUSR1|10) death signal", text), text[-3000:]
    stopped = int(re.search(r"preempted \(SIGUSR1\): stopped after step (\d+)", text).group(1))
    assert 5 <= stopped < steps
    assert f"at step {stopped}" in text  # the requeued run resumed from the preemption checkpoint
    assert [x["step"] for x in read_metrics(out) if x["kind"] == "train"] == list(range(1, steps + 1))

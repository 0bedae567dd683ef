import os
import subprocess
import sys

from conftest import REPO, TINY, read_metrics


def test_local_launcher_runs_two_cpu_ranks(tmp_path):
    env = dict(os.environ, NPROC="2", PYTHON=sys.executable)  # the interpreter running the tests
    out = tmp_path / "run"
    r = subprocess.run([str(REPO / "launch" / "local.sh"), *TINY, "--batch-size", "4",
                        "--synthetic-samples", "32", "--max-steps", "3", "--output-dir", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 x cpu (gloo)" in r.stderr
    assert [x["step"] for x in read_metrics(out) if x["kind"] == "train"] == [1, 2, 3]

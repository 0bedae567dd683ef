"""--profile-steps A:B through the real CLI: two gloo ranks under torchrun, the traces read back
as the Chrome-trace JSON that Perfetto and TensorBoard's profiler plugin open."""

import json

import pytest

from distres import profiling
from distres.config import parse_args
from distres.errors import UserError
from tests.helpers import FOLDER_RUN, TINY, read_metrics, train_here

FIRST, LAST = FOLDER_RUN["profile_steps"]
STEPS = FOLDER_RUN["steps"]


@pytest.fixture(scope="module")
def profiled(folder_run):
    """The shared 2-rank run (conftest.folder_run): --profile-steps 3:5 inside the first of its
    two 9-step epochs."""
    _, out, r = folder_run
    return out, r


def _trace(path):
    return json.loads(path.read_text())["traceEvents"]


def test_one_trace_per_rank_covering_exactly_the_window(profiled):
    out, _ = profiled
    for rank in (0, 1):
        traces = sorted((out / "profile").glob(f"rank{rank}.*.pt.trace.json"))
        assert len(traces) == 1, traces
        events = _trace(traces[0])
        steps = sorted(
            int(e["name"].split("#")[1]) for e in events if e.get("ph") == "X" and e["name"].startswith("ProfilerStep#")
        )
        assert steps == list(range(FIRST, LAST + 1))
        names = {e["name"] for e in events if e.get("ph") == "X"}
        # the real DDP step: gloo all-reduces of the gradients, the convolutions, the labelled fetches
        assert "gloo:all_reduce" in names and "aten::convolution_backward" in names
        assert profiling.DATA_WAIT in names


def test_summary_shares_add_up_to_the_window_wall_time(profiled):
    out, r = profiled
    summary = json.loads((out / "profile" / "summary-rank0.json").read_text())
    assert summary["steps"] == list(range(FIRST, LAST + 1))
    parts = summary["seconds"]
    assert set(parts) == set(profiling.CATEGORIES) and all(v >= 0 for v in parts.values())
    assert parts["convolution/matmul"] > 0 and parts["communication"] > 0 and parts["host overhead"] > 0
    # The wall time of steps A..B by the run's own clock: metrics.jsonl's "time" is read at the
    # same point of every log step, so time(B) - time(A - 1) spans exactly steps A..B.
    clock = {m["step"]: m["time"] for m in read_metrics(out) if m["kind"] == "train"}
    wall = clock[LAST] - clock[FIRST - 1]
    assert sum(parts.values()) == pytest.approx(wall, rel=0.05)
    assert sum(summary["shares"].values()) == pytest.approx(1.0, abs=0.01)
    # printed by rank 0 only, with its top ops
    assert r.stderr.count(f"distres: profile of steps {FIRST}..{LAST} on rank 0") == 1
    assert "on rank 1" not in r.stderr and "top ops by self time" in r.stderr


def test_run_continues_after_the_window_and_the_verdict_names_the_trace(profiled):
    out, r = profiled
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if m["kind"] == "train"] == list(range(1, STEPS + 1))
    epoch = [m for m in metrics if m["kind"] == "epoch"]
    assert len(epoch) == 2  # the window lies in the first epoch; its verdict (and the later ones) name the trace
    assert "trace: " in epoch[0]["verdict_detail"] and "profile/rank0." in epoch[0]["verdict_detail"]
    assert (out / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(
    "text,needle", [("3-5", "must be A:B"), ("5:3", "1 <= A <= B"), ("0:2", "1 <= A <= B"), ("x:y", "must be A:B")]
)
def test_bad_windows_are_user_errors(text, needle):
    with pytest.raises(UserError, match=needle):
        parse_args(["--profile-steps", text])


def test_window_beyond_the_run_is_one_line(tmp_path):
    r = train_here(
        TINY
        + [
            "--batch-size",
            "4",
            "--synthetic-samples",
            "16",
            "--max-steps",
            "4",
            "--profile-steps",
            "2:9",
            "--output-dir",
            str(tmp_path / "o"),
        ]
    )
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if "error" in x]
    assert lines == ["distres: error: --profile-steps 2:9: the run has 4 steps; pick a window that ends by step 4"]


def test_gpu_timeline_split():
    """The CUDA branch of the summary, on a hand-made timeline (no GPU on the test machines): a
    convolution kernel hides the first part of an all-reduce, the GPU idles while the host
    fetches a batch and while it does other host work."""

    def ev(name, ts, dur, cat, tid):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": 1, "tid": tid}

    trace = {
        "traceEvents": [
            ev("ProfilerStep#7", 0, 100, "user_annotation", 1),
            ev(profiling.DATA_WAIT, 80, 15, "user_annotation", 1),
            ev("sm90_xmma_fprop_implicit_gemm", 0, 40, "kernel", 7),
            ev("ncclDevKernel_AllReduce_Sum_f32", 30, 30, "kernel", 8),
            ev("vectorized_elementwise_kernel", 70, 10, "kernel", 7),
        ]
    }
    s = profiling.summarize(trace, "cuda")
    got = {k: round(v * 1e6, 6) for k, v in s["seconds"].items()}
    assert got == {
        "convolution/matmul": 40,
        "communication": 20,
        "normalisation/elementwise": 10,
        "data wait": 15,
        "host overhead": 15,
    }
    assert s["steps"] == [7] and s["wall_s"] == pytest.approx(100e-6)

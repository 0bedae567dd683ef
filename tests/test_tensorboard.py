"""--tensorboard through the real CLI, read back with TensorBoard's own readers: the
EventAccumulator (what TensorBoard shows) and the raw event-file loader."""

import sys

import pytest

from distres.config import parse_args
from distres.errors import UserError, format_error
from tests.helpers import TINY, read_metrics, train_here

pytest.importorskip("tensorboard", reason="the [tensorboard] extra: pip install -e '.[tensorboard]'")
from tensorboard.backend.event_processing import event_file_loader  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _shown(tb_dir) -> EventAccumulator:
    ea = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _raw_steps(tb_dir, tag: str) -> list[int]:
    """Every event of tag in every events file, in file order (no purging)."""
    steps = []
    for f in sorted(tb_dir.glob("events.out.tfevents.*")):
        for ev in event_file_loader.EventFileLoader(str(f)).Load():
            steps += [ev.step for v in ev.summary.value if v.tag == tag]
    return steps


@pytest.fixture(scope="module")
def resumed(module_dir):
    """A run that logged steps 1-5 and died with its newest checkpoint at step 3 (its step-5
    checkpoint removed), then resumed: steps 4 and 5 are logged twice."""
    out = module_dir / "run"
    common = TINY + [
        "--tensorboard",
        "--batch-size",
        "4",
        "--synthetic-samples",
        "32",
        "--epochs",
        "1",
        "--checkpoint-every",
        "3",
        "--output-dir",
        str(out),
    ]
    first = train_here(common + ["--max-steps", "5"])
    assert first.returncode == 0, first.stderr[-3000:]
    first_time = {m["step"]: m["time"] for m in read_metrics(out) if m["kind"] == "train"}
    for name in ("step-00000005.pt", "last.pt"):
        (out / "checkpoints" / name).unlink()
    second = train_here(common + ["--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr and "at step 3" in second.stderr
    return out, first_time


@pytest.mark.slow
def test_events_match_metrics_once_each_across_a_resume(resumed):
    out, first_time = resumed
    tb = out / "tensorboard"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2  # one file per process start
    assert _raw_steps(tb, "train/loss") == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]  # the file holds both attempts
    ea = _shown(tb)
    metrics = read_metrics(out)
    by_kind = {k: [m for m in metrics if m["kind"] == k] for k in ("train", "eval", "epoch")}
    for kind, prefix, fields in (
        ("train", "train", ("loss", "lr", "images_per_sec", "data_wait_frac", "time")),
        ("eval", "eval", ("top1", "top5", "val_loss")),
        ("epoch", "perf", ("data_wait_frac", "images_per_sec", "step_time")),
    ):
        for field in fields:
            shown = [(e.step, e.value) for e in ea.Scalars(f"{prefix}/{field}")]
            want = [(m["step"], pytest.approx(m[field], rel=1e-6)) for m in by_kind[kind]]
            assert shown == want, (prefix, field)
    # steps 4 and 5 are the resumed run's: its clock, not the first attempt's
    shown_time = dict((e.step, e.value) for e in ea.Scalars("train/time"))
    assert [m["step"] for m in by_kind["train"]] == list(range(1, 9))
    assert shown_time[4] != pytest.approx(first_time[4], rel=1e-6)
    assert by_kind["epoch"] and "perf/verdict_detail/text_summary" in ea.Tags()["tensors"]


def test_missing_tensorboard_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets without the extra
    with pytest.raises(UserError) as err:
        parse_args(TINY + ["--tensorboard"])
    assert format_error(err.value) == (
        "distres: error: --tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
        "(or drop --tensorboard)"
    )

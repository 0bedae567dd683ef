"""What a new user meets first: a resumed run that is already complete, Ctrl-C, the saved
config.yaml, and --help. Single-process cases run the CLI's ``main`` in this process; Ctrl-C
needs a real process to signal."""

import os
import signal

import pytest
import yaml

from distres import evaluate, predict, preempt, train
from distres.config import load_yaml
from tests.helpers import TINY, read_metrics, start_one, wait_for

SMALL = TINY + ["--batch-size", "4", "--synthetic-samples", "16", "--eval-every", "0"]


def _main(args, capsys) -> tuple[int, str]:
    code = train.main(args)
    return code, capsys.readouterr().err


def test_resuming_a_complete_run_says_so_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    args = SMALL + ["--max-steps", "2", "--output-dir", str(out)]
    code, err = _main(args, capsys)
    assert code == 0 and "done at step 2: 2 steps in" in err, err
    before = {p.name: p.read_bytes() for p in (out, out / "checkpoints") for p in p.iterdir() if p.is_file()}

    code, err = _main(args + ["--resume"], capsys)
    assert code == 0, err
    assert f"the run in {out} is complete (step 2 of 2); nothing to do" in err, err
    after = {p.name: p.read_bytes() for p in (out, out / "checkpoints") for p in p.iterdir() if p.is_file()}
    assert after == before  # no repeated eval record, no new checkpoint, config.yaml untouched

    code, err = _main(SMALL + ["--max-steps", "3", "--output-dir", str(out), "--resume"], capsys)
    assert code == 0 and "done at step 3: 1 step in" in err, err  # the steps this process ran
    evals = [r["step"] for r in read_metrics(out) if r["kind"] == "eval"]
    assert evals == [2, 3], evals


def test_config_yaml_holds_the_values_in_force_and_not_the_runs_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _main(SMALL + ["--max-steps", "1", "--output-dir", str(out)], capsys)
    assert code == 0, err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    resolved = saved["resolved"]
    assert saved["optim"]["lr"] == 0.0 and f"lr {resolved['lr']:g}," in err  # the start-up line's lr
    assert (resolved["image_size"], resolved["data_backend"], resolved["world_size"]) == (32, "synthetic", 1)
    assert "output_dir" not in saved["run"] and "resume" not in saved["checkpoint"]
    # Read back with --config: the same options, and a run of its own (the default folder).
    again = load_yaml(str(out / "config.yaml"))
    assert "output_dir" not in again and again["arch"] == "resnet18" and again["lr"] == 0.0


def test_ctrl_c_stops_after_a_step_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    run = start_one(train.main, SMALL + ["--epochs", "50", "--threads", "1", "--output-dir", str(out)])
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and read_metrics(out), 240, "the first logged step")
    except BaseException:
        run.wait(timeout=0)  # ends it
        raise
    os.kill(run.procs[0].pid, signal.SIGINT)
    r = run.wait(timeout=240)
    text = r.stdout + r.stderr
    assert r.returncode == 130, text[-3000:]
    assert "distres: Ctrl-C: stopping after this step with a checkpoint" in text, text[-3000:]
    assert "distres: preempted (SIGINT): stopped after step" in text and "--resume continues there" in text
    assert "Traceback" not in text
    step = max(r["step"] for r in read_metrics(out) if r["kind"] == "train")
    assert (out / "checkpoints" / f"step-{step:08d}.pt").is_file()


def test_a_second_ctrl_c_aborts_at_once():
    flag = preempt.PreemptionFlag(distributed=False, announce=False)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.stop_requested() and flag.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.close()
    assert signal.getsignal(signal.SIGINT) is not flag._on_signal  # the handler is given back


@pytest.mark.parametrize("tool", [evaluate, predict])
def test_help_names_each_default_once(tool):
    text = tool.build_parser().format_help()
    assert "(default: None)" not in text and "the checkpoint's)" in text
    assert all(line.count("(default") <= 1 for line in " ".join(text.split()).split("--")), text


def test_amp_auto_is_bf16_only_where_the_device_computes_in_it(monkeypatch):
    import torch

    from distres import engine, host

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert engine.resolve_amp("fp16", cpu) == "fp16" and engine.resolve_amp("none", gpu) == "none"
    assert engine.resolve_amp("auto", gpu) == "bf16"
    for native, want in ((True, "bf16"), (False, "none"), (None, "bf16")):
        monkeypatch.setattr(host, "native_bf16", lambda native=native: native)
        assert engine.resolve_amp("auto", cpu) == want
    monkeypatch.setattr(host, "native_bf16", lambda: False)
    assert engine.Precision("auto", cpu).dtype == torch.float32 and not engine.Precision("auto", cpu).enabled

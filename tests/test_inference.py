"""After training: best.pt, evaluate (also on two ranks), predict and export, all from the
checkpoint alone."""

import csv
import json

import pytest
import torch
import torchvision

from distres import evaluate, export, predict
from tests.helpers import FOLDER_RUN, break_jpeg, read_metrics, run_ranks

CLASSES = FOLDER_RUN["classes"]
# 21 validation images over 2 ranks x batch 4: neither rank's shard fills its last batch.
VAL = FOLDER_RUN["val"]


@pytest.fixture(scope="module")
def trained(folder_run):
    """The shared 2-rank gloo run on a small ImageFolder of real JPEGs (conftest.folder_run):
    EMA, the ImageNet stem (so that the stock torchvision model loads its export) and bf16."""
    data, out, _ = folder_run
    return data, out


def test_best_checkpoint_holds_the_better_weights_of_the_best_evaluation(trained):
    _, out = trained
    evals = [m for m in read_metrics(out) if m["kind"] == "eval"]
    assert len(evals) == 2
    # The earliest evaluation with the highest top-1; within it the raw weights win a tie.
    top1, minus_step, raw = max((e[f"{w}top1"], -e["step"], w == "") for e in evals for w in ("", "ema_"))
    record = torch.load(out / "checkpoints" / "best.pt", weights_only=True)["best"]
    assert (record["top1"], record["step"], record["weights"]) == (top1, -minus_step, "raw" if raw else "ema")


@pytest.mark.slow
def test_evaluate_on_two_ranks_reproduces_the_runs_last_evaluation(trained, tmp_path):
    _, out = trained
    last = [m for m in read_metrics(out) if m["kind"] == "eval"][-1]
    # The raw weights and the EMA's, each evaluated by two ranks (forked: ``run_ranks``)
    for which, prefix in (("raw", ""), ("ema", "ema_")):
        report = tmp_path / which
        args = ["--checkpoint", str(out / "checkpoints" / "last.pt"), "--weights", which, "--workers", "0"]
        args += ["--output-dir", str(report)]
        r = run_ranks(evaluate.main, args)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads((report / "summary.json").read_text())
        assert summary["eval_samples"] == sum(VAL.values())
        assert summary["top1"] == last[f"{prefix}top1"] and summary["top5"] == last[f"{prefix}top5"], which
        assert summary["val_loss"] == pytest.approx(last[f"{prefix}val_loss"], rel=1e-6)
        confusion = list(csv.reader(open(report / "confusion.csv")))
        assert confusion[0][1:] == list(CLASSES)
        counts = [[int(v) for v in row[1:]] for row in confusion[1:]]
        assert [sum(row) for row in counts] == list(VAL.values())  # rows: true classes
        wrong = list(csv.DictReader(open(report / "misclassified.csv")))
        assert len(wrong) == sum(VAL.values()) - sum(counts[i][i] for i in range(3))
        assert all(w["file"].endswith(".jpg") and w["true"] != w["pred1"] for w in wrong)
        assert (report / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "top1" in r.stdout and "most confused" in r.stdout


def test_predict_lists_and_counts_a_broken_file(trained, tmp_path, capsys):
    data, out = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    files = sorted((data / "val" / "dog").iterdir())
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    break_jpeg(folder / files[0].name, "truncated")
    preds = tmp_path / "preds.csv"
    assert (
        predict.main(
            [
                "--checkpoint",
                str(out / "checkpoints" / "best.pt"),
                str(folder),
                "--top-k",
                "2",
                "--workers",
                "0",
                "--output",
                str(preds),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(preds)))
    assert len(rows) == len(files) - 1
    assert {r["class1"] for r in rows} <= set(CLASSES) and all(float(r["prob1"]) >= float(r["prob2"]) for r in rows)
    err = capsys.readouterr().err
    assert f"unreadable: {folder / files[0].name}" in err and "1 unreadable" in err


def test_export_all_formats_pass_their_parity_check(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the export extra (pip install -e '.[export]') is not installed")
    data, out = trained
    ckpt = str(out / "checkpoints" / "last.pt")
    for fmt in export.FORMATS:
        assert export.main(["--checkpoint", ckpt, "--format", fmt, "--output", str(tmp_path / f"m.{fmt}")]) == 0
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "parity on 6 " in line and "max |logit difference|" in line, line
    assert export.main(["--checkpoint", ckpt, "--format", "onnx", "--output", str(tmp_path / "m.json")]) == 2
    assert "metadata written beside" in capsys.readouterr().err
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["image_size"] == 32 and meta["weights"] == "ema"
    # The README's one line: a safetensors export into torchvision's own model.
    from safetensors.torch import load_file

    model = torchvision.models.resnet18(num_classes=3)
    model.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    import onnx

    assert json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}["distres"])[
        "classes"
    ] == list(CLASSES)


def test_missing_or_corrupt_checkpoints_are_one_line_errors(trained, tmp_path, capsys):
    _, out = trained
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((out / "checkpoints" / "last.pt").read_bytes()[:1000])
    for path in (tmp_path / "missing.pt", corrupt):
        for main, extra in (
            (export.main, ["--format", "onnx", "--output", str(tmp_path / "x.onnx")]),
            (predict.main, [str(tmp_path)]),
            (evaluate.main, []),
        ):
            assert main(["--checkpoint", str(path), *extra]) == 2
            err = capsys.readouterr().err
            [line] = [x for x in err.splitlines() if "error" in x]
            assert line.startswith("distres: error: ") and str(path) in line and "Traceback" not in err, err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("main", [evaluate.main, predict.main, export.main])
def test_help_lists_the_flags_with_their_defaults(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--checkpoint" in out and "--weights" in out and "default: auto" in out

"""Distributed behaviour through the real CLI: gloo, two processes."""

import math

import pytest
import torch

from tests.helpers import TINY, read_metrics, train_here, train_losses, train_ranks


def _params(ckpt) -> dict:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
    # Parameters only: BN running statistics legitimately differ (DDP broadcasts rank 0's).
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """The proof that DDP is wired right: 2 ranks x 1 sample vs 1 rank x 2 accumulated samples.

    With one sample per rank, rank r's batch at step s is sample 2s+r of the epoch order, and the
    single process's micro-batch j is sample 2s+j: the same global batch, and the same BN batch
    statistics per micro-batch. DDP's averaged gradient must then equal the accumulated one.
    """
    common = TINY + [
        "--cifar-stem",  # one 32-px sample per batch: the ImageNet stem would leave BN 1x1 maps of one value
        "on",
        "--batch-size",
        "1",
        "--synthetic-samples",
        "64",
        "--max-steps",
        "6",
        "--amp",
        "none",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--weight-decay",
        "1e-4",
        "--checkpoint-every",
        "0",
        "--eval-every",
        "0",
    ]
    two = train_ranks(common + ["--output-dir", str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    one = train_here(common + ["--grad-accum", "2", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]

    p2, p1 = _params(tmp_path / "two/checkpoints/last.pt"), _params(tmp_path / "one/checkpoints/last.pt")
    init = _params_at_init()
    assert p1.keys() == p2.keys()
    moved = 0
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        moved += not torch.equal(p1[k], init[k])
    assert moved > len(p1) // 2, "training did not change the parameters"
    # Same global batch and lr: the logged (rank-averaged) losses agree too.
    for a, b in zip(train_losses(tmp_path / "two"), train_losses(tmp_path / "one")):
        assert math.isclose(a, b, rel_tol=1e-4), (a, b)


def _params_at_init() -> dict:
    from distres.models import build_model

    torch.manual_seed(0)
    m = build_model("resnet18", 10, cifar_stem=True)
    return {k: v for k, v in m.state_dict().items() if "running_" not in k and "num_batches" not in k}


@pytest.mark.slow
def test_two_processes_end_to_end(synthetic_run):
    """The shared 2-rank run (conftest.synthetic_run): batch 8 x 2 ranks, 4 epochs of 8 steps."""
    out, _, r = synthetic_run
    # rank 0 alone writes: one metrics file, each step once
    assert [p.name for p in out.rglob("metrics*")] == ["metrics.jsonl"]
    recs = read_metrics(out)
    steps = [x["step"] for x in recs if x["kind"] == "train"]
    assert steps == list(range(1, 33)), steps
    losses = train_losses(out)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8, losses
    assert all(x["images_per_sec"] > 0 for x in recs if x["kind"] == "train")
    evals = [x for x in recs if x["kind"] == "eval"]
    assert len(evals) == 4 and all(e["eval_samples"] == 16 for e in evals)
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.pt").is_file()
    assert "2 x cpu (gloo)" in r.stderr


@pytest.mark.slow
def test_a_named_backend_gives_one_process_a_group_of_one(tmp_path):
    """--dist-backend gloo on a single process: DDP at world size 1 through the real loop
    (how the cost of DDP itself is measured on one GPU), with the same result as no DDP."""
    common = TINY + [
        "--batch-size",
        "2",
        "--synthetic-samples",
        "32",
        "--max-steps",
        "4",
        "--grad-accum",
        "2",
        "--amp",
        "none",
        "--checkpoint-every",
        "0",
        "--eval-every",
        "0",
        "--deterministic",
    ]
    ddp = train_here(common + ["--dist-backend", "gloo", "--output-dir", str(tmp_path / "ddp")])
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "on 1 x cpu (gloo)" in ddp.stderr
    plain = train_here(common + ["--output-dir", str(tmp_path / "plain")])
    assert plain.returncode == 0 and "(single process)" in plain.stderr
    assert train_losses(tmp_path / "ddp") == train_losses(tmp_path / "plain")
    a, b = _params(tmp_path / "ddp/checkpoints/last.pt"), _params(tmp_path / "plain/checkpoints/last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)

from tests.helpers import TINY, train_here, train_losses


def test_same_seed_same_losses_and_other_seed_differs(tmp_path):
    args = TINY + [
        "--batch-size",
        "8",
        "--synthetic-samples",
        "64",
        "--max-steps",
        "6",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "0",
    ]
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        r = train_here(args + ["--seed", seed, "--output-dir", str(tmp_path / name)])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = train_losses(tmp_path / name)
    assert len(runs["a"]) == 6
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]

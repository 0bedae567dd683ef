import pytest
import torch
import torch.nn as nn

from distres import engine, models, optim
from distres.config import TrainConfig


@pytest.mark.parametrize("arch,params_m", [("resnet50", 23.5), ("resnext50_32x4d", 23.0), ("resnet18", 11.2)])
def test_architectures_and_num_classes(arch, params_m):
    m = models.build_model(arch, num_classes=10)
    assert m.fc.out_features == 10
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - params_m) < 0.2


def test_cifar_stem_is_automatic_for_small_images_and_overridable():
    assert models.use_cifar_stem("auto", 32) and not models.use_cifar_stem("auto", 224)
    assert models.use_cifar_stem("on", 224) and not models.use_cifar_stem("off", 32)
    m = models.build_model("resnet18", 10, cifar_stem=True)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    feats = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1)(torch.randn(2, 3, 32, 32))
    assert feats.shape[-1] == 32  # full resolution kept


def test_zero_init_residual_zeroes_the_last_bn_of_each_block():
    on = models.build_model("resnet50", 10, zero_init_residual=True)
    off = models.build_model("resnet50", 10, zero_init_residual=False)
    assert torch.count_nonzero(on.layer1[0].bn3.weight) == 0
    assert torch.count_nonzero(off.layer1[0].bn3.weight) > 0


def test_channels_last_model_and_output():
    m = models.prepare(models.build_model("resnet18", 10), torch.device("cpu"), channels_last=True,
                       sync_bn=False, distributed=False)
    assert m.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert m(x).shape == (2, 10)


def test_no_weight_decay_on_bn_and_bias():
    m = models.build_model("resnet18", 10)
    decay, no_decay = optim.param_groups(m, 1e-4)
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 1e-4
    assert all(p.ndim > 1 for p in decay["params"])
    assert any(p is m.fc.bias for p in no_decay["params"])
    assert any(p is m.bn1.weight for p in no_decay["params"])


def test_lr_schedule_warmup_cosine_and_step():
    f = [optim.lr_factor(s, 100, 10, "cosine", 10, [], 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[99] < 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    g = [optim.lr_factor(s, 100, 0, "step", 10, [3, 6], 0.1) for s in range(100)]
    assert g[29] == 1.0 and g[30] == pytest.approx(0.1) and g[60] == pytest.approx(0.01)


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_one_step_path_for_every_precision(amp):
    torch.manual_seed(0)
    m = models.build_model("resnet18", 10, cifar_stem=True)
    cfg = TrainConfig(optimizer="sgd", lr=0.05, clip_grad_norm=1.0)
    opt = optim.build_optimizer(cfg, m, 0.05, torch.device("cpu"))
    prec = engine.Precision(amp, torch.device("cpu"))
    assert prec.scaler.is_enabled() == (amp == "fp16")  # GradScaler only for fp16
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))  # small: CPU fp16 kernels are slow
    before = m.conv1.weight.detach().clone()
    losses = [engine.train_step(m, [(x, y)], nn.CrossEntropyLoss(), opt, prec, 1.0).item() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, m.conv1.weight)
    assert losses[-1] < losses[0]


def test_evaluate_counts_top1_top5_exactly():
    class Fixed(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    logits = torch.tensor([[9., 1, 2, 3, 4, 5], [1., 9, 2, 3, 4, 5], [9., 8, 7, 6, 5, 0]])
    labels = torch.tensor([0, 2, 5])
    res = engine.evaluate(Fixed(), [(logits, labels)], engine.Precision("none", torch.device("cpu")),
                          torch.device("cpu"))
    assert res["eval_samples"] == 3
    assert res["top1"] == pytest.approx(100 / 3) and res["top5"] == pytest.approx(200 / 3)


def test_grad_accumulation_skips_the_allreduce_under_torch_compile(tmp_path):
    """torch.compile wraps the DDP module; the step must still find DDP under it and run all
    micro-batches but the last inside no_sync(): one gradient all-reduce per optimizer step."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 3), gradient_as_bucket_view=True)
        calls = []

        def count(state, bucket):
            calls.append(1)
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, count)
        compiled = torch.compile(ddp, backend="eager")  # dynamo's wrapper, without inductor's compile time
        assert models.find_ddp(compiled) is ddp and models.unwrap(compiled) is ddp.module
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        prec = engine.Precision("none", torch.device("cpu"))
        micro = [(torch.randn(4, 4), torch.randint(0, 3, (4,))) for _ in range(3)]
        for step in range(2):
            engine.train_step(compiled, micro, nn.CrossEntropyLoss(), opt, prec)
            assert len(calls) == step + 1, f"{len(calls)} all-reduces after {step + 1} steps of 3 micro-batches"
        # zero_grad under DDP zeroes in place: the gradients stay DDP's bucket views
        assert all(p.grad is not None and not p.grad.any() for p in ddp.parameters())
    finally:
        tdist.destroy_process_group()

import pytest
import torch
import torch.nn as nn

from distres import engine, models, optim
from distres.config import TrainConfig
from tests.helpers import count_allreduces


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
    m = models.prepare(
        models.build_model("resnet18", 10), torch.device("cpu"), channels_last=True, sync_bn=False, distributed=False
    )
    assert m.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert m(x).shape == (2, 10)


def test_no_weight_decay_on_bn_and_bias():
    m = models.build_model("resnet18", 10)
    decay, no_decay = optim.param_groups(m, 1e-4, 0.1)
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
    # ResNet's parts (convolutions, BatchNorm, a linear head), small: without native half-precision
    # instructions a CPU computes fp16 and bf16 convolutions in slow fallback kernels, seconds a
    # step for ResNet-18's 512-channel layers.
    m = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    cfg = TrainConfig(optimizer="sgd", lr=0.05, clip_grad_norm=1.0)
    opt = optim.build_optimizer(cfg.optim, m, 0.05)
    prec = engine.Precision(amp, torch.device("cpu"))
    assert prec.scaler.is_enabled() == (amp == "fp16")  # GradScaler only for fp16
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    before = m[0].weight.detach().clone()
    losses = [engine.train_step(m, [(x, y)], nn.CrossEntropyLoss(), opt, prec, 1.0).item() for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, m[0].weight)
    assert losses[-1] < losses[0]


def test_evaluate_counts_top1_top5_exactly():
    class Fixed(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5], [1.0, 9, 2, 3, 4, 5], [9.0, 8, 7, 6, 5, 0]])
    labels = torch.tensor([0, 2, 5])
    res = engine.evaluate(
        Fixed(), [(logits, labels)], engine.Precision("none", torch.device("cpu")), torch.device("cpu")
    )
    assert res["eval_samples"] == 3
    assert res["top1"] == pytest.approx(100 / 3) and res["top5"] == pytest.approx(200 / 3)


def test_grad_accumulation_skips_the_allreduce_under_torch_compile(tmp_path):
    """torch.compile wraps the DDP module; the step must still find DDP under it and run all
    micro-batches but the last inside no_sync(): one gradient all-reduce per optimizer step."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(4, 3), gradient_as_bucket_view=True)
        calls = count_allreduces(ddp)
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


@pytest.mark.parametrize("path", ["matmul", "weight grad"])
@pytest.mark.parametrize(
    "cin,cout,hw,k,stride,pad,bias",
    [
        (8, 16, 4, 1, 1, 0, False),
        (8, 16, 4, 1, 2, 0, True),
        (8, 16, 1, 3, 1, 1, False),
        (8, 16, 1, 3, 2, 1, True),
        (8, 16, 2, 3, 1, 1, True),
        (8, 16, 2, 3, 2, 1, False),
        (8, 8, 2, 3, 1, 1, False),
        (8, 8, 4, 3, 2, 1, True),
        (3, 8, 4, 7, 2, 3, False),
    ],
)
def test_matmul_conv_equals_the_convolution(cin, cout, hw, k, stride, pad, bias, path, monkeypatch):
    """Every path of MatmulConv2d (1x1 kernels, strided 1x1, any kernel on a tiny map; the
    weight gradient alone as a matmul) gives the convolution's output and gradients, in float64,
    for NCHW and channels_last input and weights, each gradient in its parameter's strides."""
    limit = 100 if path == "matmul" else 0  # every map to the one or the other, whatever the dtype
    monkeypatch.setattr(models.MatmulConv2d, "_map_limit", lambda self, x: limit)
    torch.manual_seed(0)
    ref = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias).double()
    fast = models.matmul_convs(nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias)))[0]
    fast = fast.double()
    fast.load_state_dict(ref.state_dict())
    assert type(fast) is models.MatmulConv2d and list(fast.state_dict()) == list(ref.state_dict())
    for fmt in (torch.contiguous_format, torch.channels_last):
        ref.to(memory_format=fmt)
        fast.to(memory_format=fmt)
        x = torch.randn(3, cin, hw, hw, dtype=torch.float64).contiguous(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), fast(xb)
        if path == "weight grad":
            assert type(yb.grad_fn).__name__ == "_WeightGradAsMatmulBackward"
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(yb, ya)
        torch.testing.assert_close(xb.grad, xa.grad)
        torch.testing.assert_close(fast.weight.grad, ref.weight.grad)
        assert fast.weight.grad.stride() == fast.weight.stride()
        if bias:
            torch.testing.assert_close(fast.bias.grad, ref.bias.grad)
        ref.zero_grad()
        fast.zero_grad()


def test_matmul_conv_takes_the_maps_where_it_is_faster(monkeypatch):
    """On the CPU under bf16 autocast, maps of up to 4 pixels go to the matmul and larger maps
    to oneDNN's convolution. In fp32, 1-pixel maps go to the matmul; maps of up to 16 pixels
    (4x4) to oneDNN's convolution with the weight gradient as a matmul, when one is coming;
    larger maps, and maps in evaluation, to oneDNN's convolution alone."""
    convs, weight_grads = [], []
    real_conv, real_apply = nn.Conv2d._conv_forward, models._WeightGradAsMatmul.apply
    monkeypatch.setattr(nn.Conv2d, "_conv_forward", lambda self, *a: (convs.append(1), real_conv(self, *a))[1])
    monkeypatch.setattr(models._WeightGradAsMatmul, "apply", lambda *a: (weight_grads.append(1), real_apply(*a))[1])
    m = models.matmul_convs(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)))
    cases = [
        # map side, bf16 autocast, gradients on: (oneDNN convolutions, weight gradients as a matmul)
        (2, True, True, (0, 0)),
        (1, True, True, (0, 0)),
        (3, True, True, (2, 0)),
        (1, False, True, (0, 0)),
        (2, False, True, (0, 2)),
        (4, False, True, (0, 2)),
        (5, False, True, (2, 0)),
        (4, False, False, (2, 0)),
    ]
    for hw, amp, grad, want in cases:
        convs.clear()
        weight_grads.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), torch.set_grad_enabled(grad):
            m(torch.randn(2, 4, hw, hw))
        assert (len(convs), len(weight_grads)) == want, (hw, amp, grad)


def test_cpu_models_use_matmul_convs_and_keep_their_state_dict_keys():
    m = models.prepare(
        models.build_model("resnet50", 10), torch.device("cpu"), channels_last=True, sync_bn=False, distributed=False
    )
    assert type(m.layer4[0].conv2) is models.MatmulConv2d
    assert set(m.state_dict()) == set(models.build_model("resnet50", 10).state_dict())


def test_matmul_conv_trains_after_evaluating_first():
    """A tiny-map shape first met under inference_mode (an evaluation before any training)
    must not leave an inference tensor in the cache that a training backward then needs."""
    conv = models.matmul_convs(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1)))
    x = torch.randn(2, 4, 2, 2)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv(x).float().sum().backward()
    assert conv[0].weight.grad is not None


def test_backbone_lr_scale_puts_the_head_in_groups_of_its_own():
    m = models.build_model("resnet18", 10)
    groups = optim.param_groups(m, 1e-4, 0.1, backbone_lr_scale=0.25)
    head = {id(m.fc.weight), id(m.fc.bias)}
    for g in groups:
        in_head = {id(p) in head for p in g["params"]}
        assert len(in_head) == 1  # a group is all head or all backbone
        assert g["lr"] == (0.1 if in_head == {True} else 0.025)
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_ema_follows_the_weights_and_copies_the_bn_statistics():
    from distres.ema import EMA

    torch.manual_seed(0)
    m = models.build_model("resnet18", 10)
    start = {k: v.clone() for k, v in m.state_dict().items()}
    same, half = EMA(m, decay=0.0), EMA(m, decay=0.5, every=2)
    m.train()(torch.randn(4, 3, 32, 32))  # BN statistics move
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    same.update(m, step=1)
    half.update(m, step=1)  # not a multiple of every=2: no update
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in same.state_dict().items())  # decay 0: the weights
    assert all(torch.equal(v, start[k]) for k, v in half.state_dict().items())
    half.update(m, step=2)
    got = half.state_dict()
    assert torch.allclose(got["fc.weight"], start["fc.weight"] + 0.5)
    assert torch.equal(got["bn1.running_mean"], m.bn1.running_mean)

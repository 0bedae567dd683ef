"""--blurpool: anti-aliased strided convolutions, with the torchvision model's parameters."""

import torch

from distres import models


def test_blurpool_keeps_parameters_shapes_and_state_dict_keys():
    plain = models.build_model("resnet50", 10)
    blurred = models.build_model("resnet50", 10, blurpool=True)
    convs = [m for m in blurred.modules() if isinstance(m, models.BlurConv2d)]
    # ResNet-50: layer2-4's first blocks each have a strided 3x3 and a strided 1x1 shortcut.
    assert len(convs) == 6 and all(max(c.stride) == 2 and c.in_channels >= 16 for c in convs)
    assert not isinstance(blurred.conv1, models.BlurConv2d)  # the 3-channel stem stays
    assert sum(p.numel() for p in blurred.parameters()) == sum(p.numel() for p in plain.parameters())
    assert {k: v.shape for k, v in blurred.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    blurred.load_state_dict(plain.state_dict())  # torchvision's weights files load unchanged


def test_blurpool_forward_in_channels_last_and_from_its_description():
    net = models.build_model("resnet18", 10, cifar_stem=True, blurpool=True)
    net = models.prepare(net, torch.device("cpu"), channels_last=True, sync_bn=False, distributed=False).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = net(x)
        conv = net.layer2[0].conv1
        inner = conv(torch.randn(1, 64, 8, 8).contiguous(memory_format=torch.channels_last))
    assert y.shape == (2, 10) and torch.isfinite(y).all() and inner.shape == (1, 128, 4, 4)
    # A constant image stays constant under the low-pass filter (away from the zero padding).
    flat = torch.ones(1, 64, 8, 8)
    blurred = torch.nn.functional.conv2d(flat, conv.blur, padding=1, groups=64)
    assert torch.allclose(blurred[..., 1:-1, 1:-1], flat[..., 1:-1, 1:-1])
    meta = models.describe(net, "resnet18", [str(k) for k in range(10)], (0.5,) * 3, (0.25,) * 3, 32)
    assert meta["blurpool"] is True
    rebuilt = models.from_description(meta)
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), y, atol=1e-4)

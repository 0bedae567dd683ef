"""Starting weights (--weights): torchvision's ImageNet files from the hub cache, state dicts,
distres checkpoints and safetensors files; the head, the stem and keys that do not fit."""

import pytest
import torch
import torchvision

from distres import models, weights
from distres.config import TrainConfig
from distres.dist import DistContext
from distres.errors import UserError
from tests.helpers import TINY, train_here

CPU = DistContext(0, 0, 1, 1, torch.device("cpu"), None)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(arch="resnet18", device="cpu", channels_last=False, **kw)


def _imagenet_file(torch_home, monkeypatch) -> tuple[dict, str]:
    """A torchvision ResNet-18 state dict (1000 classes) where torchvision's hub cache keeps
    IMAGENET1K_V1, under a temporary TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    path, _, _ = weights.imagenet_file("resnet18")
    assert path.name == "resnet18-f37072fd.pth" and str(path).startswith(str(torch_home))
    path.parent.mkdir(parents=True)
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, path)
    return state, path.name


def test_imagenet_weights_load_from_the_hub_cache_with_a_new_head(tmp_path, monkeypatch, capsys):
    state, _ = _imagenet_file(tmp_path / "th", monkeypatch)
    cfg = _cfg(weights="imagenet")
    pre = weights.resolve(cfg, CPU)
    assert pre.mean == (0.485, 0.456, 0.406) and not pre.cifar_stem
    torch.manual_seed(0)
    net = models.build(
        cfg, [str(k) for k in range(10)], 32, CPU, pre
    )  # 32 px: auto would pick the CIFAR stem; the weights win
    assert "new classifier head" in capsys.readouterr().err
    got = net.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), k
    assert got["fc.weight"].shape == (10, 512)
    assert not isinstance(net.maxpool, torch.nn.Identity)  # the ImageNet stem, as the weights have


def test_offline_without_the_file_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    r = train_here([*TINY, "--weights", "imagenet", "--max-steps", "1", "--output-dir", str(tmp_path / "out")])
    assert r.returncode == 2
    [line] = [x for x in r.stderr.splitlines() if x.startswith("distres: error:")]
    assert "resnet18-f37072fd.pth" in line and str(tmp_path / "empty" / "hub" / "checkpoints") in line
    assert "Traceback" not in r.stderr


def test_weights_that_do_not_fit_are_refused_by_name(tmp_path):
    path = tmp_path / "rn50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(UserError, match=r"does not fit this model: .*(missing|unexpected|shape mismatch) layer"):
        models.build(
            _cfg(weights=str(path)), list("abcdefghij"), 224, CPU, weights.resolve(_cfg(weights=str(path)), CPU)
        )
    # A CIFAR stem asked for explicitly with ImageNet-stem weights: refused, not half-loaded.
    path18 = tmp_path / "rn18.pth"
    torch.save(
        {"state_dict": {"module." + k: v for k, v in torchvision.models.resnet18().state_dict().items()}}, path18
    )
    cfg = _cfg(weights=str(path18), cifar_stem="on")
    with pytest.raises(UserError, match="stem"):
        models.build(cfg, list("abcdefghij"), 32, CPU, weights.resolve(cfg, CPU))
    # The same file with the stem left to auto: the DDP prefix and the container are seen through.
    cfg = _cfg(weights=str(path18))
    net = models.build(cfg, [str(k) for k in range(1000)], 32, CPU, weights.resolve(cfg, CPU))
    assert torch.equal(net.state_dict()["fc.weight"], torch.load(path18)["state_dict"]["module.fc.weight"])


def test_safetensors_and_distres_files_carry_their_normalisation(tmp_path):
    import json

    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = models.build_model("resnet18", 3, cifar_stem=True)
    meta = models.describe(src, "resnet18", ["a", "b", "c"], (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 32)
    save_file(src.state_dict(), str(tmp_path / "m.safetensors"), metadata={"distres": json.dumps(meta)})
    torch.save({"format": 2, "model": {}, "ema": src.state_dict(), "meta": meta, "step": 1}, tmp_path / "ck.pt")
    for name in ("m.safetensors", "ck.pt"):  # the checkpoint's EMA weights are the ones taken
        cfg = _cfg(weights=str(tmp_path / name))
        pre = weights.resolve(cfg, CPU)
        assert pre.mean == (0.1, 0.2, 0.3) and pre.std == (0.4, 0.5, 0.6) and pre.cifar_stem
        net = models.build(cfg, ["a", "b", "c"], 32, CPU, pre)
        for k, v in src.state_dict().items():
            assert torch.equal(net.state_dict()[k], v), (name, k)


def test_other_trainers_meta_and_a_yaml_null_are_handled(tmp_path):
    from distres.config import parse_args

    path = tmp_path / "mm.pth"  # mmpretrain-style: a "meta" of its own beside the state dict
    torch.save({"meta": {"epoch": 3}, "state_dict": torchvision.models.resnet18().state_dict()}, path)
    pre = weights.resolve(_cfg(weights=str(path)), CPU)
    assert pre.meta is None and pre.mean == (0.485, 0.456, 0.406) and pre.num_classes == 1000
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("weights: null\n")
    with pytest.raises(UserError, match="weights: None .* is not a string"):
        parse_args(["--config", str(yaml_file)])

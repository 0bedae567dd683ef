import pytest
import yaml

from distres import train
from distres.config import TrainConfig, parse_args
from distres.errors import UserError
from tests.helpers import run_here


def test_defaults_and_flags():
    cfg = parse_args([])
    assert cfg == TrainConfig()
    cfg = parse_args(["--arch", "resnext50_32x4d", "--batch-size", "32", "--no-channels-last", "--amp", "fp16"])
    assert (cfg.arch, cfg.batch_size, cfg.channels_last, cfg.amp) == ("resnext50_32x4d", 32, False, "fp16")


def test_yaml_sets_defaults_and_the_cli_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("arch: resnet18\nbatch-size: 64\nlr: 0.5\nchannels_last: false\ncifar_stem: off\n")
    cfg = parse_args(["--config", str(f), "--lr", "0.2"])
    assert (cfg.arch, cfg.batch_size, cfg.lr, cfg.channels_last) == ("resnet18", 64, 0.2, False)
    assert cfg.cifar_stem == "off"  # a bare YAML off is a bool; it still means "off"


def test_saved_config_round_trips(tmp_path):
    cfg = parse_args(["--arch", "resnet18", "--epochs", "7", "--resume"])
    assert cfg.resume == "latest"
    cfg.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["epochs"] == 7
    assert parse_args(["--config", str(tmp_path / "config.yaml")]) == cfg


@pytest.mark.parametrize(
    "text,needle",
    [
        ("archh: resnet50\n", "unknown key 'archh'"),
        ("arch: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("batch_size: lots\n", "is not a int"),
        ("amp: fp8\n", "is not one of"),
    ],
)
def test_bad_config_files(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=needle):
        parse_args(["--config", str(f)])


def test_help_lists_every_flag_with_defaults():
    out = run_here(train.main, ["--help"])
    assert out.returncode == 0
    for flag in (
        "--arch",
        "--data",
        "--data-dir",
        "--data-backend",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--lr",
        "--amp",
        "--channels-last",
        "--compile",
        "--seed",
        "--output-dir",
        "--resume",
        "--checkpoint-every",
        "--wandb",
        "--config",
        "--sync-bn",
    ):
        assert flag in out.stdout, flag
    assert "(default: resnet50)" in out.stdout

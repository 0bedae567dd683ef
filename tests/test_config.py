import pytest
import yaml

from distres import train
from distres.config import SECTIONS, TrainConfig, parse_args
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
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved) == list(SECTIONS) and saved["optim"]["epochs"] == 7 and saved["data"]["dataset"] == "cifar10"
    # the run's own folder and --resume stay with it: a reused file starts a run of its own
    assert "output_dir" not in saved["run"] and "resume" not in saved["checkpoint"]
    assert parse_args(["--config", str(tmp_path / "config.yaml")]) == cfg.replace(resume=None)


def test_yaml_in_sections_and_flat_keys_mix(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  arch: resnet18\ndata:\n  dataset: mnist\n  workers: 0\noptim: {lr: 0.5}\nepochs: 3\n")
    cfg = parse_args(["--config", str(f), "--batch-size", "16"])
    assert (cfg.model.arch, cfg.data.dataset, cfg.data.workers, cfg.optim.lr) == ("resnet18", "mnist", 0, 0.5)
    assert (cfg.optim.epochs, cfg.optim.batch_size) == (3, 16)
    assert cfg.data.train_image_size == 28  # parsed once, from the data set's native size
    assert cfg == TrainConfig(arch="resnet18", data="mnist", workers=0, lr=0.5, epochs=3, batch_size=16)


def test_each_section_validates_itself():
    with pytest.raises(UserError, match="--lr-steps must be comma-separated"):
        TrainConfig(lr_steps="30,sixty").validate()
    with pytest.raises(UserError, match="--rollback-lr-factor must be in"):
        TrainConfig(rollback_lr_factor=2.0).guard.validate()
    assert TrainConfig(lr_steps="5, 9").optim.lr_step_epochs == (5, 9)
    with pytest.raises(AttributeError, match=r"set cfg\.model\.compile"):
        TrainConfig().compile = True  # would be a stray attribute that no component reads
    assert TrainConfig(profile_steps="3:4").observe.profile_window == (3, 4)
    assert TrainConfig(autotune_levers="workers,threads").tune.levers == ("workers", "threads")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("archh: resnet50\n", "unknown key 'archh'"),
        ("optim:\n  lrr: 0.1\n", "unknown key 'optim.lrr'.*did you mean 'lr'"),
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

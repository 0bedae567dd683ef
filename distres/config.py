"""Typed training configuration: CLI flags, an optional YAML file, and the saved record.

Precedence: dataclass default < ``--config FILE.yaml`` < command-line flags. The resolved
config is written to ``OUTPUT_DIR/config.yaml`` and can be passed back with ``--config``.
Every field carries its help text, so ``--help`` and the YAML keys never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distres.errors import ArgumentParser, UserError

ARCHS = ("resnet50", "resnext50_32x4d", "resnet18")
DATASETS = ("cifar10", "cifar100", "mnist", "imagefolder", "synthetic")
# The data sets known by name (data/known.py) and their native image size, the default --image-size.
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "mnist": 28}
BACKENDS = ("auto", "torch", "gpu", "dali", "synthetic")
AUTO_AUGMENT = ("none", "ta_wide", "ra", "augmix")
# What --autotune may change: settings that leave the batches alone, and the maths up to rounding.
AUTOTUNE_LEVERS = (
    "data_backend",
    "workers",
    "channels_last",
    "compile",
    "threads",
    "bucket_cap_mb",
    "broadcast_buffers",
)


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field: its default, its help line and argparse extras (choices, type, group)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- model
    arch: str = opt("resnet50", "model architecture", choices=ARCHS, group="model")
    cifar_stem: str = opt(
        "auto",
        "3x3 stride-1 stem without max-pool for small images; auto: on when image size <= 64",
        choices=("auto", "on", "off"),
        group="model",
    )
    zero_init_residual: bool = opt(True, "zero-init the last BN of each residual block", group="model")
    blurpool: bool = opt(
        False,
        "BlurPool: a fixed 3x3 low-pass filter before every strided convolution with >= 16 "
        "input channels (anti-aliased downsampling, as FFCV's ResNet-50 configs; no new parameters)",
        group="model",
    )
    channels_last: bool = opt(True, "NHWC memory format for model and inputs", group="model")
    compile: bool = opt(False, "torch.compile the model", group="model")
    compile_mode: str = opt(
        "default",
        "torch.compile mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        group="model",
    )
    sync_bn: bool = opt(False, "synchronise BatchNorm statistics across processes", group="model")

    # --- starting weights
    weights: str = opt(
        "none",
        "start from: none (random init), imagenet (torchvision's weights for --arch, from the hub "
        "cache under $TORCH_HOME, downloaded when online), or a PATH to a torchvision-style state dict, "
        "a distres checkpoint or a .safetensors file; the classifier head is replaced when the class "
        "count differs, and the weights' normalisation is used",
        group="weights",
    )
    freeze_backbone_epochs: int = opt(
        0,
        "train only the classifier head for the first N epochs (the backbone's BatchNorm statistics still adapt)",
        group="weights",
    )
    backbone_lr_scale: float = opt(
        1.0, "learning rate of every layer but the head, as a fraction of --lr", group="weights"
    )

    # --- data
    data: str = opt("cifar10", "data set", choices=DATASETS, group="data")
    data_dir: str | None = opt(
        None,
        "data folder; cifar10/cifar100: holds torchvision's cifar-10-batches-py/ or cifar-100-python/, "
        "or train/ + test/ image folders; mnist: holds train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
        "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] (or MNIST/raw/ with them), read as 3 identical "
        "channels; default ~/.cache/distres/<data> ($DISTRES_DATA), downloaded there when online; "
        "imagefolder: holds train/ and val/ (or test/)",
        group="data",
    )
    data_backend: str = opt(
        "auto",
        "input pipeline: torch (DataLoader workers), gpu (whole data set in device memory, "
        "images <= 64 px), dali (NVIDIA DALI, pip install -e '.[dali]'), synthetic; auto: synthetic "
        "for --data synthetic, gpu for cifar10/cifar100/mnist on a CUDA device, else torch",
        choices=BACKENDS,
        group="data",
    )
    image_size: int = opt(
        0,
        "training crop size; 0: 32 for cifar10/cifar100, 28 for mnist, 224 otherwise "
        "(with --progressive-resize: its END)",
        group="data",
    )
    eval_image_size: int = opt(
        0,
        "evaluation centre crop, also what evaluate, predict and export feed the model "
        "(FixRes: larger than the training crop pays, e.g. train 176, evaluate 224); "
        "0: the (final) training size",
        group="data",
    )
    eval_resize: int = opt(
        0,
        "evaluation: the shorter side is resized to this before the centre crop; "
        "0: the crop / 0.875 (256 for 224), the crop itself for images <= 64 px",
        group="data",
    )
    progressive_resize: str | None = opt(
        None,
        "START:END: train at START px in the first epochs and at END px in the last ones (FFCV's "
        "progressive resizing, e.g. 160:192), see --progressive-epochs; the batch size stays the same",
        group="data",
    )
    progressive_epochs: str | None = opt(
        None,
        "A:B for --progressive-resize: START up to epoch A (counted from 0), then growing linearly, "
        "rounded to a multiple of 32 px, to END at epoch B, then END",
        group="data",
    )
    workers: int = opt(
        -1,
        "per rank: DataLoader worker processes (torch) or DALI threads (dali); -1: from the CPUs available",
        group="data",
    )
    decode_on: str = opt(
        "workers",
        "torch backend: where JPEGs are decoded and cropped: workers (DataLoader "
        "processes, libjpeg-turbo) or device (the training device, a batch per call: nvJPEG on "
        "CUDA; the workers then only read files, and decode other formats)",
        choices=("workers", "device"),
        group="data",
    )
    on_bad_sample: str = opt(
        "skip",
        "an image that cannot be decoded: skip it (named once in the log, "
        "counted as bad_samples in metrics.jsonl) or fail (stop, naming the file)",
        choices=("skip", "fail"),
        group="data",
    )
    synthetic_classes: int = opt(1000, "number of classes of --data synthetic", group="data")
    synthetic_samples: int = opt(4096, "samples per epoch of --data synthetic (train)", group="data")
    repeated_aug: int = opt(
        1,
        "repeated augmentation: each training image N times per epoch, the copies on "
        "different processes with different augmentation (torchvision's RASampler); the "
        "epoch keeps its length, so it holds 1/N of the images; evaluation is unchanged",
        group="data",
    )

    # --- augmentation (training)
    auto_augment: str = opt(
        "none",
        "per-sample automatic augmentation after the crop and flip, as torchvision's: "
        "ta_wide (TrivialAugmentWide), ra (RandAugment, 2 ops), augmix (severity 3, width 3); "
        "torch and gpu backends",
        choices=AUTO_AUGMENT,
        group="augment",
    )
    ra_magnitude: int = opt(9, "--auto-augment ra: magnitude bin of every op, 0-30", group="augment")
    random_erase: float = opt(
        0.0,
        "probability of erasing a random box of each training image "
        "(torchvision's RandomErasing, value 0 after normalisation)",
        group="augment",
    )
    mixup_alpha: float = opt(0.0, "mixup: Beta(alpha, alpha) weight per batch, soft targets (0: off)", group="augment")
    cutmix_alpha: float = opt(
        0.0,
        "cutmix: Beta(alpha, alpha) box area per batch, soft targets (0: off); "
        "with --mixup-alpha too, each batch takes one of the two",
        group="augment",
    )

    # --- optimisation
    epochs: int = opt(90, "number of epochs", group="optim")
    max_steps: int = opt(0, "stop after this many optimizer steps (0: no limit)", group="optim")
    batch_size: int = opt(256, "batch size per process (per optimizer step and micro-batch)", group="optim")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", group="optim")
    optimizer: str = opt("sgd", "optimizer", choices=("sgd", "adamw"), group="optim")
    lr: float = opt(0.0, "peak learning rate; 0: 0.1 x global batch / 256 for sgd, 1e-3 for adamw", group="optim")
    momentum: float = opt(0.9, "SGD momentum", group="optim")
    nesterov: bool = opt(False, "Nesterov momentum", group="optim")
    weight_decay: float = opt(5e-5, "weight decay (not applied to BatchNorm and bias)", group="optim")
    schedule: str = opt(
        "cosine", "learning-rate schedule after warm-up", choices=("cosine", "step", "constant"), group="optim"
    )
    warmup_epochs: float = opt(1.0, "linear warm-up length in epochs", group="optim")
    lr_steps: str = opt("30,60,80", "epochs at which --schedule step multiplies the lr by --lr-gamma", group="optim")
    lr_gamma: float = opt(0.1, "step-schedule factor", group="optim")
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy loss", group="optim")
    clip_grad_norm: float = opt(0.0, "clip the gradient norm to this value (0: off)", group="optim")
    ema_decay: float = opt(
        0.0,
        "exponential moving average of the weights, this decay per update "
        "(e.g. 0.9998; 0: off); evaluated beside the raw weights",
        group="optim",
    )
    ema_every: int = opt(1, "update the EMA every N optimizer steps", group="optim")
    amp: str = opt(
        "bf16",
        "mixed precision: bf16 or fp16 autocast (fp16 adds a GradScaler), or none",
        choices=("none", "bf16", "fp16"),
        group="optim",
    )

    # --- run
    seed: int = opt(0, "random seed (model init, data order, augmentation)", group="run")
    deterministic: bool = opt(False, "deterministic algorithms (slower)", group="run")
    output_dir: str = opt("runs/default", "folder for config.yaml, metrics.jsonl, checkpoints/", group="run")
    resume: str | None = opt(
        None,
        "continue from a checkpoint: 'latest' (the newest in OUTPUT_DIR/checkpoints) or a "
        "path; --resume alone means latest",
        group="run",
    )
    rescale_lr_on_resume: bool = opt(
        False,
        "a run resumed with another global batch (batch x grad-accum x processes) scales the learning "
        "rate by new/old global batch; without it the run keeps its learning rate",
        group="run",
    )
    on_nonfinite: str = opt(
        "stop",
        "a non-finite loss (or fp16 gradients that stay non-finite), found at log steps and before "
        "every checkpoint: stop (error naming the step and the last good checkpoint), or rollback (reload the "
        "last good checkpoint and scale the lr by --rollback-lr-factor, at most --rollback-tries times)",
        choices=("stop", "rollback"),
        group="run",
    )
    rollback_lr_factor: float = opt(0.5, "--on-nonfinite rollback: multiply the learning rate by this", group="run")
    rollback_tries: int = opt(3, "--on-nonfinite rollback: give up (as stop) after this many rollbacks", group="run")
    checkpoint_every: int = opt(
        1000, "save a checkpoint every N steps, besides each epoch end (0: epoch ends only)", group="run"
    )
    keep_checkpoints: int = opt(3, "step checkpoints kept besides last.pt", group="run")
    log_every: int = opt(50, "log (and reduce metrics across ranks) every N steps", group="run")
    eval_every: int = opt(1, "evaluate every N epochs (0: only at the end)", group="run")
    progress: bool = opt(True, "progress bar on rank 0", group="run")
    wandb: str = opt(
        "auto",
        "Weights & Biases logging, one run per job from rank 0, files under "
        "OUTPUT_DIR/wandb; auto: WANDB_MODE if set, else online when an API key is configured "
        "(WANDB_API_KEY or ~/.netrc), else offline",
        choices=("auto", "online", "offline", "disabled"),
        group="run",
    )

    # --- distributed
    device: str = opt(
        "auto", "training device; auto: cuda when available", choices=("auto", "cpu", "cuda"), group="dist"
    )
    dist_backend: str = opt(
        "auto",
        "process-group backend; auto: nccl on CUDA, gloo on CPU, none for a single "
        "process (naming one gives a single process a group of one, and DDP)",
        choices=("auto", "nccl", "gloo"),
        group="dist",
    )
    dist_timeout: float = opt(
        10.0,
        "minutes a process may wait in one training step, evaluation or checkpoint (its collectives) "
        "before the job stops: every waiting process names the step, what it waited in and the processes "
        "that never arrived (under --compile, steps that may compile are not timed)",
        group="dist",
    )
    bucket_cap_mb: float = opt(25.0, "DDP gradient bucket size in MB", group="dist")
    static_graph: bool = opt(False, "DDP static_graph (same graph every step)", group="dist")
    broadcast_buffers: bool = opt(
        True,
        "DDP re-broadcasts rank 0's BatchNorm buffers (running mean/var) before every forward; "
        "--no-broadcast-buffers skips that copy, each rank then keeps its own running statistics "
        "(evaluation uses each rank's, checkpoints rank 0's, and a resumed run starts every rank "
        "from rank 0's)",
        group="dist",
    )
    threads: int = opt(0, "CPU runs: intra-op threads per process; 0: this process's share of the CPUs", group="dist")
    bench_comm_probe: bool = opt(
        False,
        "benchmark only (benchmarks/scaling.py): every other log window skips the gradient "
        "all-reduce (DDP no_sync) to measure the exposed communication time; the ranks' weights "
        "drift apart, so never for real training",
        group="dist",
    )

    # --- profiling, TensorBoard, autotuning
    profile_steps: str | None = opt(
        None,
        "profile optimizer steps A:B (inclusive, counted from 1 like metrics.jsonl's step; pick A "
        "after the first few warm-up steps, e.g. 20:24) with torch.profiler on every rank: one "
        "Chrome/Perfetto trace per rank in OUTPUT_DIR/profile/ (TensorBoard's profiler plugin opens "
        "them) and a summary of where the time went from rank 0",
        group="perf",
    )
    profile_shapes: bool = opt(False, "--profile-steps: record each op's input shapes", group="perf")
    profile_memory: bool = opt(False, "--profile-steps: record memory allocations", group="perf")
    tensorboard: bool = opt(
        False,
        "write the logged scalars (train, eval, perf, GPU telemetry) as "
        "TensorBoard events to OUTPUT_DIR/tensorboard/ from rank 0 "
        "(pip install -e '.[tensorboard]')",
        group="perf",
    )
    autotune: bool = opt(
        False,
        "before training, time short windows of the real step per setting that does not change "
        "the training maths or the batches (see --autotune-levers), keep the fastest, and train with it; "
        "the table goes to OUTPUT_DIR/autotune.json. A resumed run reuses that choice",
        group="perf",
    )
    autotune_budget: float = opt(60.0, "--autotune: seconds the trials may take in all", group="perf")
    autotune_steps: int = opt(8, "--autotune: timed optimizer steps per trial (after 2 warm-up steps)", group="perf")
    autotune_levers: str = opt(
        "all", "--autotune: comma-separated settings to tune, of " + ", ".join(AUTOTUNE_LEVERS), group="perf"
    )
    autotune_retune: bool = opt(
        False, "--autotune on a resumed run: tune again instead of reusing OUTPUT_DIR/autotune.json", group="perf"
    )

    def validate(self) -> TrainConfig:
        positive = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "log_every": self.log_every,
            "ema_every": self.ema_every,
            "synthetic_classes": self.synthetic_classes,
            "synthetic_samples": self.synthetic_samples,
            "autotune_steps": self.autotune_steps,
            "repeated_aug": self.repeated_aug,
            "rollback_tries": self.rollback_tries,
        }
        for name, value in positive.items():
            if value <= 0:
                raise UserError(f"--{flag(name)} must be > 0 (got {value})")
        for name in (
            "epochs",
            "max_steps",
            "checkpoint_every",
            "eval_every",
            "image_size",
            "freeze_backbone_epochs",
            "threads",
            "eval_image_size",
            "eval_resize",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"--{flag(name)} must be >= 0 (got {getattr(self, name)})")
        if self.epochs == 0 and self.max_steps == 0:
            raise UserError("--epochs 0 with no --max-steps trains nothing; set one of them")
        if self.lr < 0:
            raise UserError(f"--lr must be >= 0 (got {self.lr})")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"--ema-decay must be in [0, 1) (got {self.ema_decay}); e.g. 0.9998, or 0 for off")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise UserError(
                f"--dist-timeout must be a positive number of minutes (got {self.dist_timeout:g}); "
                "e.g. 30 for slow steps"
            )
        if not 0.0 < self.rollback_lr_factor <= 1.0:
            raise UserError(f"--rollback-lr-factor must be in (0, 1] (got {self.rollback_lr_factor:g}); e.g. 0.5")
        self._validate_augment()
        if self.backbone_lr_scale < 0:
            raise UserError(f"--backbone-lr-scale must be >= 0 (got {self.backbone_lr_scale})")
        if self.keep_checkpoints < 1:
            raise UserError("--keep-checkpoints must be >= 1")
        if self.data == "imagefolder" and not self.data_dir:
            raise UserError("--data imagefolder needs --data-dir PATH (a folder with train/ and val/)")
        if self.autotune_budget <= 0:
            raise UserError(
                f"--autotune-budget must be > 0 seconds (got {self.autotune_budget:g}); e.g. --autotune-budget 60"
            )
        self.tuned_levers()
        self.profile_window()
        self.check_sizes()
        if self.tensorboard:
            _require_tensorboard()
        try:
            self.lr_step_epochs()
        except ValueError:
            raise UserError(
                f"--lr-steps must be comma-separated epochs like 30,60,80 (got {self.lr_steps!r})"
            ) from None
        return self

    def _validate_augment(self) -> None:
        if not 0 <= self.ra_magnitude <= 30:
            raise UserError(
                f"--ra-magnitude must be a bin from 0 to 30 (got {self.ra_magnitude}); torchvision's default is 9"
            )
        if not 0.0 <= self.random_erase <= 1.0:
            raise UserError(f"--random-erase is a probability in [0, 1] (got {self.random_erase:g}); e.g. 0.25")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise UserError(f"--{flag(name)} must be >= 0, 0 for off (got {getattr(self, name):g}); e.g. 0.2")

    def profile_window(self) -> tuple[int, int] | None:
        """--profile-steps A:B as (A, B), or None."""
        if self.profile_steps is None:
            return None
        text = str(self.profile_steps)
        first, sep, last = text.partition(":")
        try:
            a, b = int(first), int(last)
        except ValueError:
            raise UserError(
                f"--profile-steps must be A:B, the first and last optimizer step to profile, like 20:24 (got {text!r})"
            ) from None
        if not sep or a < 1 or a > b:
            raise UserError(
                f"--profile-steps {text}: need 1 <= A <= B (steps count from 1); e.g. --profile-steps 20:24"
            )
        return a, b

    def tuned_levers(self) -> list[str]:
        """The settings --autotune may change (--autotune-levers)."""
        names = [n.strip().replace("-", "_") for n in str(self.autotune_levers).split(",") if n.strip()]
        if names == ["all"]:
            return list(AUTOTUNE_LEVERS)
        unknown = [n for n in names if n not in AUTOTUNE_LEVERS]
        if unknown or not names:
            raise UserError(
                f"--autotune-levers: unknown setting {', '.join(unknown) or repr(self.autotune_levers)}; "
                f"use all or a comma-separated list of {', '.join(AUTOTUNE_LEVERS)}"
            )
        return names

    def resize_schedule(self):
        """--progressive-resize as a ``resolution.Schedule``, or None."""
        from distres import resolution

        return resolution.parse(self.progressive_resize, self.progressive_epochs)

    def check_sizes(self) -> None:
        schedule = self.resize_schedule()
        if schedule and self.image_size and self.image_size != schedule.end:
            raise UserError(
                f"--image-size {self.image_size} and --progressive-resize {self.progressive_resize} name "
                "two final training sizes; drop --image-size (END is the final size)"
            )
        crop, resize = self.eval_sizes()
        if self.eval_resize and resize < crop:
            raise UserError(
                f"--eval-resize {resize} is smaller than the evaluation crop {crop}; "
                "the shorter side must be at least the crop (or 0 for the default)"
            )

    def train_image_size(self) -> int:
        """The (final) training crop: --image-size, END of --progressive-resize, else the data
        set's native size."""
        schedule = self.resize_schedule()
        return self.image_size or (schedule.end if schedule else NATIVE_SIZE.get(self.data, 224))

    def eval_sizes(self) -> tuple[int, int]:
        """(centre crop, shorter side before it) of evaluation; the side 0 means
        ``transforms.eval_size``'s default for the crop."""
        return self.eval_image_size or self.train_image_size(), self.eval_resize

    def lr_step_epochs(self) -> list[int]:
        return [int(s) for s in str(self.lr_steps).split(",") if s.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
GROUPS = {
    "model": "model",
    "weights": "starting weights and fine-tuning",
    "data": "data",
    "augment": "training augmentation",
    "optim": "optimisation and precision",
    "run": "run, outputs and checkpoints",
    "dist": "distributed",
    "perf": "profiling, TensorBoard and autotuning",
}


def _require_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401  (the optional extra)
    except ImportError:
        raise UserError(
            "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' (or drop --tensorboard)"
        ) from None


def flag(name: str) -> str:
    return name.replace("_", "-")


def load_yaml(path: str) -> dict:
    """Read a YAML config; keys may be snake_case or kebab-case."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read --config {path}: {e.strerror}; check the path") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise UserError(f"--config {path} is not valid YAML{where}; fix the file") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"--config {path} must be a mapping of option: value")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see --help for the options"
            raise UserError(f"unknown key '{key}' in --config {path}; {hint}")
        values[name] = value
    return values


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


TRAIN_DESCRIPTION = (
    "Train ResNet-50 / ResNeXt-50 with DistributedDataParallel. "
    "Run as `python -m distres.train` or `torchrun --nproc_per_node N -m distres.train`."
)


def build_parser(
    prog: str = "python -m distres.train", description: str = TRAIN_DESCRIPTION
) -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--config", metavar="FILE.yaml", default=None, help="YAML file of option: value; command-line flags override it"
    )
    groups = {k: p.add_argument_group(v) for k, v in GROUPS.items()}
    for f in dataclasses.fields(TrainConfig):
        md = f.metadata
        g = groups[md["group"]]
        name = "--" + flag(f.name)
        if isinstance(f.default, bool):
            g.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=md["help"])
        elif f.name == "resume":
            g.add_argument(name, nargs="?", const="latest", default=None, metavar="PATH|latest", help=md["help"])
        else:
            typ = str if f.default is None else type(f.default)
            g.add_argument(name, type=typ, default=f.default, choices=md.get("choices"), help=md["help"])
    return p


def parse_args(argv: list[str] | None = None, **parser_kw: str) -> TrainConfig:
    """The config from flags and --config; parser_kw (prog, description) names another CLI."""
    parser = build_parser(**parser_kw)
    known, _ = _config_only().parse_known_args(argv)
    if known.config:
        values = load_yaml(known.config)
        for name, value in values.items():
            f = FIELDS[name]
            choices = f.metadata.get("choices")
            if choices and isinstance(value, bool):  # YAML 1.1 reads a bare on/off as a bool
                value = "on" if value else "off"
            if choices and value not in choices:
                raise UserError(f"{name}: {value!r} in --config {known.config} is not one of {', '.join(choices)}")
            if isinstance(f.default, bool):
                value = _bool(value) if isinstance(value, str) else bool(value)
            elif isinstance(f.default, (int, float)) and not isinstance(value, type(f.default)):
                try:
                    value = type(f.default)(value)
                except (TypeError, ValueError):
                    raise UserError(
                        f"{name}: {value!r} in --config {known.config} is not a {type(f.default).__name__}"
                    ) from None
            elif isinstance(f.default, str) or (f.default is None and value is not None):
                if not isinstance(value, str):
                    raise UserError(
                        f"{name}: {value!r} in --config {known.config} is not a string; "
                        f"e.g. {name}: {f.default or 'PATH'}"
                    )
            values[name] = value
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    kw = {name: getattr(args, name) for name in FIELDS}
    return TrainConfig(**kw).validate()


def _config_only() -> argparse.ArgumentParser:
    p = ArgumentParser(add_help=False)
    p.add_argument("--config", default=None)
    return p

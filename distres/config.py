"""Typed training configuration in sections: CLI flags, an optional YAML file, and the saved record.

Each section (model, finetune, data, augment, optim, run, checkpoint, guard, dist, observe, tune)
is a dataclass that validates itself and parses its structured values once (``lr_steps``,
``progressive_resize``, ``profile_steps``, ``autotune_levers``); a component is handed the
section it owns. The flags stay flat (``--lr``, not ``--optim-lr``): each field is one flag of
the same name, kebab-cased, except the data set's name, ``data.dataset``, which is ``--data``.

Precedence: dataclass default < ``--config FILE.yaml`` < command-line flags. A YAML file holds
sections (``optim: {lr: 0.1}``) or flat keys (``lr: 0.1``). The resolved config is written to
``OUTPUT_DIR/config.yaml`` in sections and can be passed back with ``--config``. Every field
carries its help line, so ``--help`` and the YAML keys never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from distres.errors import ArgumentParser, UserError, out_of_range

ARCHS = ("resnet50", "resnext50_32x4d", "resnet18")
DATASETS = ("cifar10", "cifar100", "mnist", "imagefolder", "shards", "synthetic")
# The data sets known by name (data/known.py) and their native image size, the default --image-size.
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "mnist": 28}
BACKENDS = ("auto", "torch", "gpu", "dali", "synthetic")
AUTO_AUGMENT = ("none", "ta_wide", "ra", "augmix")
AMP = ("auto", "none", "bf16", "fp16")
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
    """A config field: its default, its help line, argparse extras (choices, flag) and, for a
    number, its range: ``at_least``/``above`` (the lower bound, inclusive/exclusive),
    ``at_most``/``below`` (the upper), ``error`` (the message, with {value}, when a bound needs
    more words than the generic one)."""
    return field(default=default, metadata={"help": help, **kw})


def flag(name: str) -> str:
    return name.replace("_", "-")


def check_ranges(section: object) -> None:
    for f in dataclasses.fields(section):
        error = out_of_range("--" + flag(_option_name(f)), getattr(section, f.name), f.metadata)
        if error:
            raise UserError(error)


class Section:
    """A part of the configuration: ``validate`` checks the declared range of each of its number
    fields (``opt``'s ``at_least``/``above``/``at_most``/``below``), then ``check``, the rules
    of its own that a range cannot say (a section's own checks may use the values)."""

    def validate(self) -> None:
        check_ranges(self)
        self.check()

    def check(self) -> None:
        """The section's own rules (none by default)."""


@dataclass
class ModelConfig(Section):
    arch: str = opt("resnet50", "model architecture", choices=ARCHS)
    cifar_stem: str = opt(
        "auto", "3x3 stride-1 stem without max-pool; auto: on for images <= 64 px", choices=("auto", "on", "off")
    )
    zero_init_residual: bool = opt(True, "zero-init the last BN of each residual block")
    blurpool: bool = opt(False, "BlurPool: a fixed low-pass filter before each strided convolution (>= 16 channels)")
    channels_last: bool = opt(True, "NHWC memory format for model and inputs")
    compile: bool = opt(False, "torch.compile the model")
    compile_mode: str = opt(
        "default",
        "torch.compile mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    sync_bn: bool = opt(False, "synchronise BatchNorm statistics across processes")


@dataclass
class FinetuneConfig(Section):
    weights: str = opt(
        "none",
        "start from: none, imagenet (torchvision's, from $TORCH_HOME) or a PATH (state dict, checkpoint, .safetensors)",
    )
    freeze_backbone_epochs: int = opt(0, "train only the classifier head for the first N epochs", at_least=0)
    backbone_lr_scale: float = opt(1.0, "learning rate of every layer but the head, as a fraction of --lr", at_least=0)


@dataclass
class DataConfig(Section):
    dataset: str = opt("cifar10", "data set", choices=DATASETS, flag="data")
    data_dir: str | None = opt(
        None,
        "data folder (see docs/data.md for each data set's layout); default ~/.cache/distres/<data> ($DISTRES_DATA)",
    )
    data_backend: str = opt(
        "auto",
        "input pipeline: torch, gpu (data set in device memory, <= 64 px), dali, synthetic; auto: by data set and device",
        choices=BACKENDS,
    )
    image_size: int = opt(0, "training crop size; 0: 32 for cifar, 28 for mnist, 224 otherwise", at_least=0)
    eval_image_size: int = opt(
        0, "evaluation centre crop (also for evaluate, predict, export); 0: the training size", at_least=0
    )
    eval_resize: int = opt(
        0, "evaluation: shorter side before the centre crop; 0: crop / 0.875 (the crop <= 64 px)", at_least=0
    )
    progressive_resize: str | None = opt(None, "START:END: train at START px first, END px last (e.g. 160:192)")
    progressive_epochs: str | None = opt(None, "A:B for --progressive-resize: START up to epoch A, END from epoch B")
    workers: int = opt(
        -1, "per rank: DataLoader workers (torch) or DALI threads; -1: from the CPUs available", at_least=-1
    )
    decode_on: str = opt(
        "workers", "torch backend: decode JPEGs in the workers or on the training device", choices=("workers", "device")
    )
    on_bad_sample: str = opt(
        "skip", "an undecodable image: skip it (named, counted) or fail (stop, naming it)", choices=("skip", "fail")
    )
    max_image_pixels: int = opt(
        89_478_485,
        "an image whose header declares more pixels is skipped, not decoded (PIL's limit); 0: no limit",
        at_least=0,
    )
    exclude_files: str | None = opt(None, "a file listing image paths to leave out, one per line (bad_samples.txt)")
    synthetic_classes: int = opt(1000, "number of classes of --data synthetic", above=0)
    synthetic_samples: int = opt(4096, "samples per epoch of --data synthetic (train)", above=0)
    repeated_aug: int = opt(
        1, "repeated augmentation: each training image N times per epoch, on different processes", above=0
    )
    cache_dir: str | None = opt(None, "--data shards from a URL: keep the shards read in this local folder")
    shuffle_scope: str = opt(
        "global",
        "--data shards: global (any sample next) or shard (shards in a shuffled order, each shuffled within)",
        choices=("global", "shard"),
    )
    cache_size: str = opt("64G", "the most --cache-dir may hold (K/M/G suffixes); the oldest shards go first")

    def check(self) -> None:
        if self.dataset == "imagefolder" and not self.data_dir:
            raise UserError("--data imagefolder needs --data-dir PATH (a folder with train/ and val/)")
        if self.dataset == "shards" and not self.data_dir:
            raise UserError(
                "--data shards needs --data-dir (the OUT folder or URL of python -m distres.prepare shards)"
            )
        if self.shuffle_scope == "shard" and self.dataset != "shards":
            raise UserError("--shuffle-scope shard orders the shards of --data shards; drop it for other data")
        self.cache_bytes  # noqa: B018 (parsed here, so a bad value is a one-line error before anything runs)
        schedule = self.resize_schedule
        if schedule and self.image_size and self.image_size != schedule.end:
            raise UserError(
                f"--image-size {self.image_size} and --progressive-resize {self.progressive_resize} name "
                "two final training sizes; drop --image-size (END is the final size)"
            )
        crop, resize = self.eval_sizes
        if self.eval_resize and resize < crop:
            raise UserError(
                f"--eval-resize {resize} is smaller than the evaluation crop {crop}; "
                "the shorter side must be at least the crop (or 0 for the default)"
            )

    @property
    def cache_bytes(self) -> int:
        from distres.data.shardformat import parse_size

        try:
            return parse_size(self.cache_size)
        except ValueError as e:
            raise UserError(f"--cache-size: {e}") from None

    @cached_property
    def resize_schedule(self):
        """--progressive-resize as a ``resolution.Schedule``, or None."""
        from distres import resolution

        return resolution.parse(self.progressive_resize, self.progressive_epochs)

    @property
    def train_image_size(self) -> int:
        """The (final) training crop: --image-size, END of --progressive-resize, else the data
        set's native size."""
        schedule = self.resize_schedule
        return self.image_size or (schedule.end if schedule else NATIVE_SIZE.get(self.dataset, 224))

    @property
    def eval_sizes(self) -> tuple[int, int]:
        """(centre crop, shorter side before it) of evaluation; the side 0 means
        ``transforms.eval_size``'s default for the crop."""
        return self.eval_image_size or self.train_image_size, self.eval_resize


@dataclass
class AugmentConfig(Section):
    auto_augment: str = opt(
        "none", "per-sample automatic augmentation, as torchvision's (torch and gpu backends)", choices=AUTO_AUGMENT
    )
    ra_magnitude: int = opt(
        9,
        "--auto-augment ra: magnitude bin of every op, 0-30",
        at_least=0,
        at_most=30,
        error="--ra-magnitude must be a bin from 0 to 30 (got {value}); torchvision's default is 9",
    )
    random_erase: float = opt(
        0.0,
        "probability of erasing a random box of each training image",
        at_least=0,
        at_most=1,
        error="--random-erase is a probability in [0, 1] (got {value}); e.g. 0.25",
    )
    mixup_alpha: float = opt(
        0.0,
        "mixup: Beta(alpha, alpha) weight per batch (0: off)",
        at_least=0,
        error="--mixup-alpha must be >= 0, 0 for off (got {value}); e.g. 0.2",
    )
    cutmix_alpha: float = opt(
        0.0,
        "cutmix: Beta(alpha, alpha) box area per batch (0: off); with mixup, one of the two",
        at_least=0,
        error="--cutmix-alpha must be >= 0, 0 for off (got {value}); e.g. 0.2",
    )


@dataclass
class OptimConfig(Section):
    epochs: int = opt(90, "number of epochs", at_least=0)
    max_steps: int = opt(0, "stop after this many optimizer steps (0: no limit)", at_least=0)
    batch_size: int = opt(256, "batch size per process (per optimizer step and micro-batch)", above=0)
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step", above=0)
    optimizer: str = opt("sgd", "optimizer", choices=("sgd", "adamw"))
    lr: float = opt(0.0, "peak learning rate; 0: 0.1 x global batch / 256 for sgd, 1e-3 for adamw", at_least=0)
    momentum: float = opt(0.9, "SGD momentum", at_least=0, below=1)
    nesterov: bool = opt(False, "Nesterov momentum")
    weight_decay: float = opt(5e-5, "weight decay (not applied to BatchNorm and bias)", at_least=0)
    schedule: str = opt("cosine", "learning-rate schedule after warm-up", choices=("cosine", "step", "constant"))
    warmup_epochs: float = opt(1.0, "linear warm-up length in epochs", at_least=0)
    lr_steps: str = opt("30,60,80", "epochs at which --schedule step multiplies the lr by --lr-gamma")
    lr_gamma: float = opt(0.1, "step-schedule factor", above=0)
    label_smoothing: float = opt(0.1, "label smoothing of the cross-entropy loss", at_least=0, below=1)
    clip_grad_norm: float = opt(0.0, "clip the gradient norm to this value (0: off)", at_least=0)
    ema_decay: float = opt(
        0.0,
        "EMA of the weights with this decay per update (e.g. 0.9998; 0: off)",
        at_least=0,
        below=1,
        error="--ema-decay must be in [0, 1) (got {value}); e.g. 0.9998, or 0 for off",
    )
    ema_every: int = opt(1, "update the EMA every N optimizer steps", above=0)
    amp: str = opt(
        "auto",
        "mixed precision: bf16 or fp16 autocast (fp16 adds a GradScaler), none, or auto: bf16 where the device has it",
        choices=AMP,
    )

    def check(self) -> None:
        if self.epochs == 0 and self.max_steps == 0:
            raise UserError("--epochs 0 with no --max-steps trains nothing; set one of them")
        self.lr_step_epochs  # noqa: B018 (parsed here: a malformed list fails before anything is built)

    @cached_property
    def lr_step_epochs(self) -> tuple[int, ...]:
        try:
            return tuple(int(s) for s in str(self.lr_steps).split(",") if s.strip())
        except ValueError:
            raise UserError(
                f"--lr-steps must be comma-separated epochs like 30,60,80 (got {self.lr_steps!r})"
            ) from None


@dataclass
class RunConfig(Section):
    seed: int = opt(0, "random seed (model init, data order, augmentation)", at_least=0, below=2**63)
    deterministic: bool = opt(False, "deterministic algorithms (slower)")
    output_dir: str = opt("runs/default", "folder for config.yaml, metrics.jsonl, checkpoints/")
    eval_every: int = opt(1, "evaluate every N epochs (0: only at the end)", at_least=0)


@dataclass
class CheckpointConfig(Section):
    resume: str | None = opt(None, "continue from a checkpoint: 'latest' (OUTPUT_DIR/checkpoints) or a path")
    rescale_lr_on_resume: bool = opt(False, "resumed with another global batch: scale the lr by new/old global batch")
    checkpoint_every: int = opt(
        1000, "save a checkpoint every N steps, besides each epoch end (0: epoch ends only)", at_least=0
    )
    keep_checkpoints: int = opt(3, "step checkpoints kept besides last.pt", at_least=1)


@dataclass
class GuardConfig(Section):
    on_nonfinite: str = opt(
        "stop",
        "a non-finite loss: stop, or rollback to the last good checkpoint with a lower lr",
        choices=("stop", "rollback"),
    )
    rollback_lr_factor: float = opt(
        0.5,
        "--on-nonfinite rollback: multiply the learning rate by this",
        above=0,
        at_most=1,
        error="--rollback-lr-factor must be in (0, 1] (got {value}); e.g. 0.5",
    )
    rollback_tries: int = opt(3, "--on-nonfinite rollback: give up (as stop) after this many rollbacks", above=0)
    dist_timeout: float = opt(
        10.0,
        "minutes a process may wait in one step, evaluation or checkpoint before the job stops",
        above=0,
        error="--dist-timeout must be a positive number of minutes (got {value}); e.g. 30 for slow steps",
    )


@dataclass
class DistConfig(Section):
    device: str = opt("auto", "training device; auto: cuda when available", choices=("auto", "cpu", "cuda"))
    dist_backend: str = opt(
        "auto",
        "process-group backend; auto: nccl on CUDA, gloo on CPU, none for a single process",
        choices=("auto", "nccl", "gloo"),
    )
    bucket_cap_mb: float = opt(25.0, "DDP gradient bucket size in MB", above=0)
    static_graph: bool = opt(False, "DDP static_graph (same graph every step)")
    broadcast_buffers: bool = opt(True, "DDP re-broadcasts rank 0's BatchNorm buffers before every forward")
    threads: int = opt(0, "CPU runs: intra-op threads per process; 0: this process's share of the CPUs", at_least=0)
    bench_comm_probe: bool = opt(
        False, "benchmarks only: every other log window skips the gradient all-reduce (never for real training)"
    )


@dataclass
class ObserveConfig(Section):
    log_every: int = opt(50, "log (and reduce metrics across ranks) every N steps", above=0)
    progress: bool = opt(True, "progress bar on rank 0")
    wandb: str = opt(
        "auto",
        "Weights & Biases from rank 0; auto: WANDB_MODE, else online with an API key, else offline",
        choices=("auto", "online", "offline", "disabled"),
    )
    tensorboard: bool = opt(False, "TensorBoard events in OUTPUT_DIR/tensorboard/ (pip install -e '.[tensorboard]')")
    profile_steps: str | None = opt(
        None, "profile optimizer steps A:B (from 1, e.g. 20:24): traces in OUTPUT_DIR/profile/"
    )
    profile_shapes: bool = opt(False, "--profile-steps: record each op's input shapes")
    profile_memory: bool = opt(False, "--profile-steps: record memory allocations")

    def check(self) -> None:
        self.profile_window  # noqa: B018 (parsed here: a malformed window fails before anything is built)
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401  (the optional extra)
            except ImportError:
                raise UserError(
                    "--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
                    "(or drop --tensorboard)"
                ) from None

    @cached_property
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


@dataclass
class TuneConfig(Section):
    autotune: bool = opt(False, "time the speed-only settings before training and train with the fastest")
    autotune_budget: float = opt(
        60.0,
        "--autotune: seconds the trials may take in all",
        above=0,
        error="--autotune-budget must be > 0 seconds (got {value}); e.g. --autotune-budget 60",
    )
    autotune_steps: int = opt(8, "--autotune: timed optimizer steps per trial (after 2 warm-up steps)", above=0)
    autotune_levers: str = opt("all", "--autotune: comma-separated settings to tune, of " + ", ".join(AUTOTUNE_LEVERS))
    autotune_retune: bool = opt(False, "--autotune on a resumed run: tune again instead of reusing autotune.json")

    def check(self) -> None:
        self.levers  # noqa: B018 (parsed here: an unknown lever fails before anything is built)

    @cached_property
    def levers(self) -> tuple[str, ...]:
        """The settings --autotune may change (--autotune-levers)."""
        names = [n.strip().replace("-", "_") for n in str(self.autotune_levers).split(",") if n.strip()]
        if names == ["all"]:
            return AUTOTUNE_LEVERS
        unknown = [n for n in names if n not in AUTOTUNE_LEVERS]
        if unknown or not names:
            raise UserError(
                f"--autotune-levers: unknown setting {', '.join(unknown) or repr(self.autotune_levers)}; "
                f"use all or a comma-separated list of {', '.join(AUTOTUNE_LEVERS)}"
            )
        return tuple(names)


# Options that belong to one run: a saved config.yaml leaves them out.
RUN_OWN = ("output_dir", "resume")
# config.yaml's section of values in force (the lr, image size, ... placeholders stood for).
RESOLVED = "resolved"
# Section name -> (its class, its --help heading). The order is --help's and config.yaml's.
SECTIONS: dict[str, tuple[type, str]] = {
    "model": (ModelConfig, "model"),
    "finetune": (FinetuneConfig, "starting weights and fine-tuning"),
    "data": (DataConfig, "data"),
    "augment": (AugmentConfig, "training augmentation"),
    "optim": (OptimConfig, "optimisation and precision"),
    "run": (RunConfig, "run and outputs"),
    "checkpoint": (CheckpointConfig, "checkpoints and resume"),
    "guard": (GuardConfig, "guards: divergence and hangs"),
    "dist": (DistConfig, "distributed"),
    "observe": (ObserveConfig, "logging, profiling and TensorBoard"),
    "tune": (TuneConfig, "autotuning"),
}


def _option_name(f: dataclasses.Field) -> str:
    """A field's flat name: its flag in snake_case (the field's own name but for --data)."""
    return f.metadata.get("flag", f.name)


# Flat option name (a flag in snake_case, a flat YAML key, a key of a checkpoint's record)
# -> (section, field).
WHERE: dict[str, tuple[str, str]] = {
    _option_name(f): (section, f.name) for section, (cls, _) in SECTIONS.items() for f in dataclasses.fields(cls)
}
FIELDS: dict[str, dataclasses.Field] = {
    _option_name(f): f for cls, _ in SECTIONS.values() for f in dataclasses.fields(cls)
}
# Field name -> section, for reading a field through the whole config (``cfg.lr``).
_SECTION_OF = {field_name: section for section, field_name in WHERE.values()}


class TrainConfig:
    """The whole configuration: one attribute per section (``cfg.optim.lr``).

    Built from flat option names, as the flags name them (``TrainConfig(lr=0.1, data="mnist")``).
    A field can also be read through the whole config (``cfg.lr``), for scripts and the
    few places that combine sections; components are handed their own section.
    """

    model: ModelConfig
    finetune: FinetuneConfig
    data: DataConfig
    augment: AugmentConfig
    optim: OptimConfig
    run: RunConfig
    checkpoint: CheckpointConfig
    guard: GuardConfig
    dist: DistConfig
    observe: ObserveConfig
    tune: TuneConfig

    def __init__(self, **options: Any):
        parts: dict[str, dict] = {name: {} for name in SECTIONS}
        for name, value in options.items():
            if name not in WHERE:
                raise TypeError(f"TrainConfig: unknown option {name!r}")
            section, field_name = WHERE[name]
            parts[section][field_name] = value
        for section, (cls, _) in SECTIONS.items():
            setattr(self, section, cls(**parts[section]))

    def __setattr__(self, name: str, value: Any) -> None:
        # A field set through the whole config would become a stray attribute the components
        # never read (they read their section): say where it lives instead.
        if name not in SECTIONS:
            where = f"; set cfg.{_SECTION_OF[name]}.{name}" if name in _SECTION_OF else ""
            raise AttributeError(f"TrainConfig holds only its sections{where}")
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called for names that are not sections: a field read through the whole config.
        section = _SECTION_OF.get(name)
        if section is None:
            raise AttributeError(f"TrainConfig has no option or section {name!r}")
        part = self.__dict__.get(section)
        if part is None:  # (while unpickling, before the sections exist)
            raise AttributeError(name)
        return getattr(part, name)

    def options(self) -> dict:
        """Every option by its flat name: what a checkpoint records."""
        return {name: getattr(getattr(self, s), f) for name, (s, f) in WHERE.items()}

    def sections(self) -> dict:
        """Every option by section: what config.yaml holds."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def replace(self, **options: Any) -> TrainConfig:
        """A copy with some options (flat names) changed."""
        return TrainConfig(**{**self.options(), **options})

    def validate(self) -> TrainConfig:
        for name in SECTIONS:
            getattr(self, name).validate()
        return self

    def save(self, path: Path, resolved: dict | None = None) -> None:
        """config.yaml: every option but the run's own folder and --resume (a file reused with
        --config starts a run of its own), and what the placeholders (0, -1, auto) resolved to
        in this run, as information."""
        saved = self.sections()
        for name in RUN_OWN:
            section, field_name = WHERE[name]
            del saved[section][field_name]
        if resolved:
            saved[RESOLVED] = resolved
        header = f"# distres configuration; --config reads it back ('{RESOLVED}' is information only)\n"
        path.write_text(header + yaml.safe_dump(saved, sort_keys=False))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainConfig) and self.options() == other.options()

    def __repr__(self) -> str:
        return f"TrainConfig({', '.join(f'{k}={v!r}' for k, v in self.options().items())})"


def load_yaml(path: str) -> dict:
    """A YAML config file as flat options. Sections or flat keys; keys snake_case or kebab-case."""
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
        if name == RESOLVED:
            continue
        if name in SECTIONS and isinstance(value, dict):
            for sub, sub_value in value.items():
                values[_section_key(name, str(sub).replace("-", "_"), path)] = sub_value
        else:
            values[_known(name, key, FIELDS, path)] = value
    return values


def _section_key(section: str, name: str, path: str) -> str:
    """The flat name of key ``name`` in section ``section`` of a YAML file."""
    names = {f.name: _option_name(f) for f in dataclasses.fields(SECTIONS[section][0])}
    names.update({flat: flat for flat in names.values()})  # the flag's name works too (data: {data: ...})
    return names[_known(name, f"{section}.{name}", names, path)]


def _known(name: str, key: str, names, path: str) -> str:
    if name not in names:
        close = difflib.get_close_matches(name, list(names), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see --help for the options"
        raise UserError(f"unknown key '{key}' in --config {path}; {hint}")
    return name


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
    )
    p.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=None,
        help="YAML file of options (in sections or flat); flags override it",
    )
    for cls, heading in SECTIONS.values():
        group = p.add_argument_group(heading)
        for f in dataclasses.fields(cls):
            name, help_text = "--" + flag(_option_name(f)), f.metadata["help"]
            if isinstance(f.default, bool):
                group.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            elif f.name == "resume":
                group.add_argument(name, nargs="?", const="latest", default=None, metavar="PATH|latest", help=help_text)
            else:
                typ = str if f.default is None else type(f.default)
                group.add_argument(name, type=typ, default=f.default, choices=f.metadata.get("choices"), help=help_text)
    return p


def _typed(name: str, value: Any, path: str) -> Any:
    """A value read from YAML as the type its option holds."""
    f = FIELDS[name]
    choices = f.metadata.get("choices")
    if choices and isinstance(value, bool):  # YAML 1.1 reads a bare on/off as a bool
        value = "on" if value else "off"
    if choices and value not in choices:
        raise UserError(f"{name}: {value!r} in --config {path} is not one of {', '.join(choices)}")
    if isinstance(f.default, bool):
        return _bool(value) if isinstance(value, str) else bool(value)
    if isinstance(f.default, (int, float)) and not isinstance(value, type(f.default)):
        try:
            return type(f.default)(value)
        except (TypeError, ValueError):
            raise UserError(f"{name}: {value!r} in --config {path} is not a {type(f.default).__name__}") from None
    if (isinstance(f.default, str) or (f.default is None and value is not None)) and not isinstance(value, str):
        raise UserError(f"{name}: {value!r} in --config {path} is not a string; e.g. {name}: {f.default or 'PATH'}")
    return value


def parse_args(argv: list[str] | None = None, **parser_kw: str) -> TrainConfig:
    """The config from flags and --config; parser_kw (prog, description) names another CLI."""
    parser = build_parser(**parser_kw)
    known, _ = _config_only().parse_known_args(argv)
    if known.config:
        values = load_yaml(known.config)
        parser.set_defaults(**{name: _typed(name, value, known.config) for name, value in values.items()})
    args = parser.parse_args(argv)
    return TrainConfig(**{name: getattr(args, name) for name in FIELDS}).validate()


def _config_only() -> argparse.ArgumentParser:
    p = ArgumentParser(add_help=False)
    p.add_argument("--config", default=None)
    return p

"""Where metrics go. Only rank 0 writes; other ranks get the do-nothing base logger.

``metrics.jsonl`` is always written (one JSON object per log step, evaluation and epoch);
Weights & Biases is imported lazily, and its trouble is a warning, never a failed run;
TensorBoard events (``--tensorboard``) carry the same values under the same names.
"""

from __future__ import annotations

import configparser
import json
import math
import netrc
import os
import secrets
import string
import warnings
from pathlib import Path
from urllib.parse import urlparse

from distres.errors import console


class Logger:
    """Does nothing: what non-zero ranks use, and the base of the real loggers."""

    def log(self, record: dict) -> None:
        pass

    def rewind(self, step: int) -> None:
        """The run went back to optimizer step ``step`` (a rollback): forget what came after,
        where the format allows."""

    def close(self) -> None:
        pass


class JsonlLogger(Logger):
    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            self._drop_after(resume_step)
        self._f = open(path, "a", buffering=1)  # line-buffered: a crash loses at most one line

    def rewind(self, step: int) -> None:
        self._f.close()
        self._drop_after(step)
        self._f = open(self.path, "a", buffering=1)

    def _drop_after(self, step: int) -> None:
        # A resumed (or rolled back) run re-does the steps after its checkpoint; drop their old
        # records so the file holds each step once.
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line torn by a crash
                continue
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self._f.close()


# W&B's own modes; "auto" resolves to one of them (resolve_wandb_mode).
WANDB_MODES = ("online", "offline", "disabled")


def _wandb_settings_base_url(env) -> str | None:
    # wandb's settings file (written by `wandb login --host`) may point at a private server.
    path = Path(env.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb") / "settings"
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
        return parser.get("default", "base_url", fallback=None)
    except (configparser.Error, OSError):
        return None


def wandb_base_url(env=None) -> str:
    env = os.environ if env is None else env
    return env.get("WANDB_BASE_URL") or _wandb_settings_base_url(env) or "https://api.wandb.ai"


def wandb_key_configured(env=None) -> bool:
    """True when W&B would find an API key without asking: WANDB_API_KEY, or a netrc entry for
    the W&B host (what `wandb login` writes). Reads files only; never prompts or connects."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(wandb_base_url(env)).hostname or ""
    path = Path(env.get("NETRC") or Path(env.get("HOME") or Path.home()) / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(requested: str, env=None) -> tuple[str, str | None]:
    """(mode, note): auto follows WANDB_MODE if set, else online with an API key, else offline.
    Online without a key would make wandb prompt for one; it becomes offline with a note."""
    env = os.environ if env is None else env
    mode = requested
    if mode == "auto":
        aliases = {"dryrun": "offline", "run": "online"}
        mode = aliases.get(env.get("WANDB_MODE", ""), env.get("WANDB_MODE", ""))
        if mode not in WANDB_MODES:
            mode = "online" if wandb_key_configured(env) else "offline"
    if mode == "online" and not wandb_key_configured(env):
        return "offline", (
            "W&B: no API key (WANDB_API_KEY or a ~/.netrc entry from `wandb login`); "
            "logging offline, upload later with `wandb sync`"
        )
    return mode, None


def _new_run_id() -> str:
    # W&B's own id format: 8 characters of lowercase letters and digits.
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def open_wandb_run(requested: str, output_dir: Path, config: dict, name: str, *, resume: bool, job_type: str = "train"):
    """A W&B run whose every file lies under ``output_dir/wandb``, or None.

    The run id is kept in ``output_dir/wandb/run-id``: a resumed run (a requeued SLURM job,
    ``--resume``) continues the same W&B run. Any W&B failure is a warning, never an error:
    online trouble falls back to offline, and offline trouble to no W&B at all.
    """
    mode, note = resolve_wandb_mode(requested)
    if note:  # a choice the user made that cannot be honoured: their line, not a Python warning
        console(f"distres: warning: {note}")
    if mode == "disabled":
        return None
    base_url = wandb_base_url()  # read before WANDB_CONFIG_DIR moves under the output dir
    try:
        wdir = output_dir / "wandb"
        for var, sub in (
            ("WANDB_DIR", ""),
            ("WANDB_CACHE_DIR", "cache"),
            ("WANDB_CONFIG_DIR", "config"),
            ("WANDB_DATA_DIR", "data"),
        ):
            (wdir / sub).mkdir(parents=True, exist_ok=True)
            os.environ[var] = str(wdir / sub)
        import wandb

        id_file = wdir / "run-id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else _new_run_id()
        id_file.write_text(run_id + "\n")
    except Exception as e:
        warnings.warn(f"W&B disabled: {type(e).__name__}: {e}", stacklevel=2)
        return None
    for attempt in (mode, "offline") if mode == "online" else (mode,):
        try:
            return wandb.init(
                project=os.environ.get("WANDB_PROJECT", "distres"),
                mode=attempt,
                dir=str(output_dir),
                config=config,
                name=name,
                id=run_id,
                resume="allow",
                job_type=job_type,
                settings=wandb.Settings(init_timeout=90, base_url=base_url),
            )
        except Exception as e:
            warnings.warn(
                f"W&B {attempt} start failed ({type(e).__name__}: {e})"
                + ("; trying offline" if attempt == "online" else "; continuing without W&B"),
                stacklevel=2,
            )
    return None


PREFIX = {"train": "train", "eval": "eval", "epoch": "perf"}


def metric_row(record: dict) -> dict:
    """A record's values under the names W&B and TensorBoard show: train/*, eval/* and perf/*
    (epoch records), with ``epoch`` as a plain column; no kind, step or missing values."""
    prefix = PREFIX.get(record.get("kind"), "other")
    return {
        (k if k == "epoch" else f"{prefix}/{k}"): v
        for k, v in record.items()
        if k not in ("kind", "step") and v is not None
    }


class WandbLogger(Logger):
    """Rank 0's records into one W&B run: ``metric_row`` history rows at the optimizer step."""

    def __init__(self, mode: str, output_dir: Path, config: dict, run_name: str, resume: bool):
        self.run = open_wandb_run(mode, output_dir, config, run_name, resume=resume)

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metric_row(record), step=record.get("step"))
        except Exception as e:
            warnings.warn(f"W&B log failed, no more W&B logging for this run: {e}", stacklevel=2)
            self.run = None

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                warnings.warn(f"W&B finish failed: {e}", stacklevel=2)


class TensorBoardLogger(Logger):
    """Rank 0's records as TensorBoard events in ``output_dir/tensorboard``: the numbers of
    ``metric_row`` as scalars at the optimizer step (the same names as in W&B), the verdict text
    as text. ``epoch`` is a scalar only in the epoch records, where it is the epoch's number.

    A resumed run opens the writer with ``purge_step`` = the first step it will log again, the
    mechanism TensorBoard defines for this: the new events file starts with a marker, and
    readers that honour it (TensorBoard itself, ``EventAccumulator``) drop the earlier files'
    events from that step on, so each step is shown once, from the run that logged it last."""

    def __init__(self, output_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter  # the optional extra, checked by config

        self.writer = SummaryWriter(
            str(output_dir / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1
        )

    def log(self, record: dict) -> None:
        step = record.get("step")
        for name, value in metric_row(record).items():
            if name == "epoch" and record.get("kind") != "epoch":
                continue  # a fraction on train records; an axis, not a curve
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)):
                if math.isfinite(value):
                    self.writer.add_scalar(name, value, global_step=step)
            elif name.endswith("verdict_detail"):
                self.writer.add_text(name, str(value), global_step=step)

    def close(self) -> None:
        self.writer.close()


class MultiLogger(Logger):
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, record: dict) -> None:
        for lg in self.loggers:
            lg.log(record)

    def rewind(self, step: int) -> None:
        for lg in self.loggers:
            lg.rewind(step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def build(cfg, is_main: bool, output_dir: Path, resume_step: int | None, run_info: dict | None = None) -> Logger:
    """metrics.jsonl (+ W&B, + TensorBoard) on rank 0, the no-op Logger elsewhere: one W&B run per job.
    ``run_info`` (world size, device, ...) joins the resolved config in W&B's config."""
    if not is_main:
        return Logger()
    loggers: list[Logger] = [JsonlLogger(output_dir / "metrics.jsonl", resume_step)]
    if cfg.observe.wandb != "disabled":
        loggers.append(
            WandbLogger(
                cfg.observe.wandb,
                output_dir,
                {**cfg.options(), **(run_info or {})},
                output_dir.name,
                resume=resume_step is not None,
            )
        )
    if cfg.observe.tensorboard:
        loggers.append(TensorBoardLogger(output_dir, resume_step))
    return MultiLogger(loggers)

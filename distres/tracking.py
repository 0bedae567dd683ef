"""Where metrics go. Only rank 0 writes; other ranks get the do-nothing base logger.

``metrics.jsonl`` is always written (one JSON object per log step and per evaluation);
Weights & Biases is optional and imported lazily.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path


class Logger:
    """Does nothing: what non-zero ranks use, and the base of the real loggers."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger(Logger):
    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is not None and path.exists():
            self._drop_after(resume_step)
        self._f = open(path, "a", buffering=1)  # line-buffered: a crash loses at most one line

    def _drop_after(self, step: int) -> None:
        # A resumed run re-does the steps after its checkpoint; drop their old records so the
        # file holds each step once.
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


class WandbLogger(Logger):
    def __init__(self, mode: str, output_dir: Path, config: dict, run_name: str):
        wdir = output_dir / "wandb"
        wdir.mkdir(parents=True, exist_ok=True)
        for var, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "cache"),
                         ("WANDB_CONFIG_DIR", "config"), ("WANDB_DATA_DIR", "data")):
            os.environ.setdefault(var, str(wdir / sub))
        self.run = None
        try:
            import wandb
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "distres"), mode=mode,
                                  dir=str(output_dir), config=config, name=run_name)
        except Exception as e:  # W&B trouble never stops a training run
            warnings.warn(f"W&B disabled: {type(e).__name__}: {e}", stacklevel=2)

    def log(self, record: dict) -> None:
        if self.run is not None:
            try:
                self.run.log({k: v for k, v in record.items() if v is not None}, step=record.get("step"))
            except Exception as e:
                warnings.warn(f"W&B log failed: {e}", stacklevel=2)

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                warnings.warn(f"W&B finish failed: {e}", stacklevel=2)


class MultiLogger(Logger):
    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, record: dict) -> None:
        for lg in self.loggers:
            lg.log(record)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def build(cfg, is_main: bool, output_dir: Path, resume_step: int | None) -> Logger:
    if not is_main:
        return Logger()
    loggers: list[Logger] = [JsonlLogger(output_dir / "metrics.jsonl", resume_step)]
    if cfg.wandb != "disabled":
        loggers.append(WandbLogger(cfg.wandb, output_dir, cfg.to_dict(), output_dir.name))
    return MultiLogger(loggers)


def console(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

"""The one place that reads the launcher's environment.

torchrun (and ``torch.distributed.run``) sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT. A plain ``python -m distres.train`` sets none of them and runs as a world of one.
SLURM's own variables are mapped here too, so ``srun python -m distres.train`` (one task per
GPU, no torchrun) works; with ``srun torchrun ...`` torchrun's variables win.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distres.errors import RankError, UserError, console
from distres.host import available_cpus


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    restart: int = 0  # > 0: torchrun restarted the workers or SLURM requeued the job

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def say(self, line: str) -> None:
        """A line for the user from rank 0 (the other ranks would repeat it)."""
        if self.is_main:
            console(line)

    @property
    def cpus_per_rank(self) -> int:
        """This process's share of the CPUs it may run on (affinity-aware: SLURM, taskset)."""
        return max(1, available_cpus() // max(1, self.local_world_size))


def _env_int(env: dict, *names: str, default: int) -> int:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return default


def launch_info(env: dict | None = None) -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) from torchrun, SLURM, or none."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / torch.distributed.run
        rank = _env_int(env, "RANK", default=0)
        world = _env_int(env, "WORLD_SIZE", default=1)
        local_rank = _env_int(env, "LOCAL_RANK", default=0)
        local_world = _env_int(env, "LOCAL_WORLD_SIZE", default=world)
    elif "SLURM_PROCID" in env and _env_int(env, "SLURM_NTASKS", default=1) > 1:  # srun, no torchrun
        rank = _env_int(env, "SLURM_PROCID", default=0)
        world = _env_int(env, "SLURM_NTASKS", default=1)
        local_rank = _env_int(env, "SLURM_LOCALID", default=0)
        local_world = _env_int(env, "SLURM_NTASKS_PER_NODE", default=world)
    else:
        rank, local_rank, world, local_world = 0, 0, 1, 1
    return rank, local_rank, world, local_world


def restart_count(env: dict | None = None) -> int:
    """How often the launcher has started this job before: torchrun's worker-group restarts
    (--max-restarts) or SLURM's requeues. A restarted job must resume, not start over."""
    env = os.environ if env is None else env
    return _env_int(env, "TORCHELASTIC_RESTART_COUNT", default=0) + _env_int(env, "SLURM_RESTART_COUNT", default=0)


def rank_from_env() -> int:
    """The global rank without initialising anything (for deciding who prints an error)."""
    return launch_info()[0]


def gpu_index(local_rank: int, visible: int, env: dict | None = None) -> int:
    """Which of the visible GPUs this process trains on: its local rank, except under
    ``srun --gpus-per-task=1`` (no torchrun), where SLURM shows each task only its own GPU,
    as cuda:0, whatever its SLURM_LOCALID."""
    env = os.environ if env is None else env
    if local_rank < visible:
        return local_rank
    if visible == 1 and "RANK" not in env and "SLURM_PROCID" in env:
        return 0
    raise RankError(
        f"local rank {local_rank} has no GPU (only {visible} visible); "
        f"launch at most {visible} processes per node (torchrun --nproc_per_node {visible})"
    )


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count()))
    if requested == "cpu":
        return torch.device("cpu")
    raise UserError(f"unknown --device {requested!r}; use auto, cpu or cuda")


_store = None  # the job's key-value store (the launcher's rendezvous store), once joined


def job_store():
    """The store the process group was built on, or None for a single process."""
    return _store


def init(
    device: str = "auto", backend: str = "auto", timeout_s: float = 1800, deterministic: bool = False
) -> DistContext:
    """Read the environment, pick the device and backend, and join the process group.
    ``timeout_s``: how long a collective (and the rendezvous) may wait."""
    global _store
    if deterministic:
        # cuBLAS reads it when it first starts on a device: set it before any CUDA work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    rank, local_rank, world, local_world = launch_info()
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    restart = restart_count()
    if world == 1 and backend == "auto":
        return DistContext(rank, local_rank, world, local_world, dev, None, restart)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise UserError("--dist-backend nccl needs CUDA GPUs; use --dist-backend gloo on CPUs")
    timeout = datetime.timedelta(seconds=timeout_s)
    if world == 1:
        # A backend named for a single process: a process group of one, so the run goes through
        # DDP and the collectives exactly as a multi-process run does (and their cost is measurable).
        store = dist.HashStore()
    else:
        env = os.environ
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise UserError(
                "a multi-process launch needs MASTER_ADDR and MASTER_PORT; start with torchrun "
                "(or launch/ and slurm/ scripts), which set them"
            )
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # After torchrun restarts the workers (--max-restarts) they meet in the same store again,
        # where the previous attempt's gloo addresses are still listed: a rank that starts before
        # its peers would connect to a dead process. A key prefix per attempt keeps them apart.
        store = dist.PrefixStore(f"distres/attempt_{restart}", store)
    _store = store
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=rank,
        world_size=world,
        timeout=timeout,
        # Binding the device lets NCCL set up its communicator eagerly and avoids the
        # "guessing device ID" warning; gloo ignores it.
        **({"device_id": dev} if dev.type == "cuda" else {}),
    )
    return DistContext(rank, local_rank, world, local_world, dev, backend, restart)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across ranks in place; a no-op for a single process.

    The tensor lives on the training device (CPU for gloo, GPU for nccl), never a hard-coded
    'cuda', so the same call serves both backends.
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj) -> list:
    """Every rank's obj, in rank order, on every rank ([obj] for a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics): under DDP each rank's
    last forward updated its own, while checkpoints hold rank 0's. One broadcast per dtype."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    by_dtype: dict = {}
    for b in module.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for bufs in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, 0)
        torch._foreach_copy_(bufs, [f.view_as(b) for f, b in zip(flat.split([b.numel() for b in bufs]), bufs)])


def broadcast_object(obj):
    """Rank 0's obj on every rank (obj itself for a single process): what rank 0 decided."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

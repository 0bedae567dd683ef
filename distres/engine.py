"""THE training step and evaluation. One code path for fp32, bf16 and fp16.

Mixed precision is ``autocast(enabled=amp != "none")`` plus a GradScaler that is only enabled
for fp16 (a disabled scaler passes losses and steps straight through), so there is no second
step function to drift out of sync with the first.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from distres import dist, host
from distres.models import find_ddp, unwrap

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp: str, device: torch.device) -> str:
    """--amp auto: bf16 on GPUs and on CPUs with bf16 instructions; fp32 ("none") on a CPU
    without them, where bf16 autocast is emulated and several times slower than fp32."""
    if amp != "auto":
        return amp
    return "none" if device.type == "cpu" and host.native_bf16() is False else "bf16"


def set_numerics(deterministic: bool, training: bool = True) -> None:
    """The cuDNN and TF32 flags of training, and of evaluate, so that evaluating a checkpoint
    picks the kernels training did and reproduces its figures (on a GPU, another convolution
    algorithm or matmul precision can flip a near-tie between two classes). Only deterministic
    runs pick their kernels reproducibly: cudnn.benchmark times the candidates, so two processes
    may pick differently. A forward pass alone (``training=False``) gets cuDNN's deterministic
    choice without the global checks, which would also need dist.init's cuBLAS workspace."""
    if deterministic:
        if training:
            torch.use_deterministic_algorithms(True)  # (dist.init set CUBLAS_WORKSPACE_CONFIG for it)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune convolutions once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class Precision:
    def __init__(self, amp: str, device: torch.device):
        self.amp = amp = resolve_amp(amp, device)
        self.enabled = amp != "none"
        self.dtype = AMP_DTYPES.get(amp, torch.float32)
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def train_step(
    model: nn.Module, micro_batches, loss_fn, optimizer, precision: Precision, clip_grad_norm: float = 0.0
) -> torch.Tensor:
    """One optimizer step over one or more micro-batches; returns the mean loss (on device,
    no host sync: reading it is left to the logging step)."""
    scaler = precision.scaler
    n = len(micro_batches)
    ddp = find_ddp(model)
    total = None
    for i, (images, labels) in enumerate(micro_batches):
        # Skip the gradient all-reduce on all but the last micro-batch; DDP then averages the
        # accumulated gradients once.
        with ddp.no_sync() if ddp is not None and i < n - 1 else contextlib.nullcontext():
            with precision.autocast():
                loss = loss_fn(model(images), labels) / n
            scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    # Under DDP the gradients are views into its all-reduce buckets (gradient_as_bucket_view):
    # zeroing them in place keeps those views; set_to_none would drop them every step.
    optimizer.zero_grad(set_to_none=ddp is None)
    return total


@torch.inference_mode()
def evaluate(model: nn.Module, loader, precision: Precision, device: torch.device, each=None) -> dict:
    """Top-1/top-5 and loss over exactly the validation set: each rank scores its disjoint
    shard, and the sums (not per-rank means) are added across ranks. ``each(logits, labels)``,
    when given, sees every batch (``distres.evaluate``'s per-sample report)."""
    net = unwrap(model)  # no DDP hooks or buffer broadcasts during evaluation
    was_training = net.training
    net.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top1, top5
    count = 0  # counted on the host: a device counter would cost a host-to-device copy per batch
    for images, labels in loader:
        with precision.autocast():
            logits = net(images)
        logits = logits.float()
        if each is not None:
            each(logits, labels)
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
        count += len(labels)
    totals = dist.all_reduce_sum(torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64, device=device)]))
    net.train(was_training)
    loss, top1, top5, count = totals.tolist()
    count = int(count)
    return {
        "val_loss": loss / max(count, 1),
        "top1": 100.0 * top1 / max(count, 1),
        "top5": 100.0 * top5 / max(count, 1),
        "eval_samples": count,
    }

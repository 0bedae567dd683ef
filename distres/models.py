"""The model of a run: a torchvision ResNet (with the CIFAR stem for small images) in the chosen
memory format, then ``parallelize`` wraps it for training: DDP across processes, then
``torch.compile``. ``unwrap`` and ``find_ddp`` see through those wrappers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from distres import weights
from distres.errors import UserError

_BUILDERS = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "resnext50_32x4d": torchvision.models.resnext50_32x4d,
}


def use_cifar_stem(setting: str, image_size: int) -> bool:
    # At 32 px the ImageNet stem (7x7 stride 2 + max-pool) leaves layer4 with 1x1 maps and
    # costs several points of accuracy; a 3x3 stride-1 stem keeps the resolution.
    if setting == "auto":
        return image_size <= 64
    return setting == "on"


def build_model(
    arch: str, num_classes: int, cifar_stem: bool = False, zero_init_residual: bool = True, blurpool: bool = False
) -> nn.Module:
    if arch not in _BUILDERS:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(_BUILDERS)}")
    model = _BUILDERS[arch](weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    if blurpool:
        blur_strided_convs(model)
    return model


class BlurConv2d(nn.Conv2d):
    """A strided convolution that first low-passes its input with a fixed 3x3 binomial filter
    ([1 2 1] x [1 2 1] / 16, depthwise, stride 1): anti-aliased downsampling (Zhang, "Making
    convolutional networks shift-invariant again", 2019), as FFCV's and Composer's BlurPool.
    The filter is a non-persistent buffer, so the state dict keeps torchvision's keys and
    shapes: the same weights files load with and without it."""

    def add_blur(self) -> BlurConv2d:
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :] / 16).expand(self.in_channels, 1, 3, 3)
        self.register_buffer("blur", kernel.to(self.weight.device).contiguous(), persistent=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.conv2d(x, self.blur.to(x.dtype), padding=1, groups=self.in_channels)
        return super().forward(x)


BLUR_MIN_CHANNELS = 16  # FFCV's rule: not the stem's 3-channel convolution


def blur_strided_convs(model: nn.Module) -> nn.Module:
    """Every strided Conv2d with at least 16 input channels as a BlurConv2d (FFCV's
    ``apply_blurpool``; the max-pool of the stem stays)."""
    for m in model.modules():
        if type(m) is nn.Conv2d and max(m.stride) > 1 and m.in_channels >= BLUR_MIN_CHANNELS:
            m.__class__ = BlurConv2d
            m.add_blur()
    return model


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


class MatmulConv2d(nn.Conv2d):
    """A Conv2d that computes as matrix products on the small feature maps where oneDNN's CPU
    convolutions are slow: a ResNet on 32-px images with the ImageNet stem runs layer3 at 2x2
    and layer4 at 1x1, and there oneDNN's backward took several times as long as the same
    products as matmuls (``benchmarks/cpu_convs.py`` measures each layer and the whole step).
    Under bf16 autocast, maps of at most ``TINY_MAP`` pixels are one matmul each way. In fp32,
    1-pixel maps are one matmul; on maps of up to ``WEIGHT_GRAD_MAP`` pixels oneDNN's forward
    and input gradient hold up, and only the weight gradient, its slow part, is one matmul over
    the input's patches (``_WeightGradAsMatmul``). The same parameters, the same result up to
    summation order; everything else goes to the convolution."""

    TINY_MAP = 4
    WEIGHT_GRAD_MAP = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.groups != 1
            or self.dilation != (1, 1)
            or self.padding_mode != "zeros"
            or x.dim() != 4
            or isinstance(self.padding, str)
            or x.device.type != "cpu"
        ):
            return super().forward(x)
        pixels = x.shape[-2] * x.shape[-1]
        if pixels <= self._map_limit(x):
            return self._matmul(x)
        if pixels <= self.WEIGHT_GRAD_MAP and self._weight_grad_as_matmul(x):
            return _WeightGradAsMatmul.apply(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)

    def _map_limit(self, x: torch.Tensor) -> int:
        """The largest map computed as one matmul, forward and backward."""
        bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        return self.TINY_MAP if bf16 else 1

    def _weight_grad_as_matmul(self, x: torch.Tensor) -> bool:
        # Only where a weight gradient is coming, outside autocast (whose casts the custom
        # backward would not see) and outside torch.compile (which makes its own kernels).
        return (
            torch.is_grad_enabled()
            and self.weight.requires_grad
            and not torch.is_autocast_enabled("cpu")
            and x.dtype == self.weight.dtype
            and not torch.compiler.is_compiling()
        )

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == (1, 1) and self.padding == (0, 0):
            sh, sw = self.stride
            x = x[:, :, ::sh, ::sw] if (sh, sw) != (1, 1) else x
            n, c, h, w = x.shape
            # N x H x W x C rows (a view for channels_last input), one output channel per column.
            y = nn.functional.linear(x.permute(0, 2, 3, 1).reshape(-1, c), _tap(self.weight, 0, 0), self.bias)
            return y.view(n, h, w, -1).permute(0, 3, 1, 2)
        n, c, h, w = x.shape
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if h == w == 1 and (kh, kw) == (2 * ph + 1, 2 * pw + 1):
            # One pixel padded to the kernel's size: only the centre tap meets it, whatever the stride.
            y = nn.functional.linear(x.reshape(n, c), _tap(self.weight, ph, pw), self.bias)
            return y.view(n, -1, 1, 1)
        return self._tiny_map(x)

    def _tiny_map(self, x: torch.Tensor) -> torch.Tensor:
        """Every output pixel from every input pixel: y[n, (o, cout)] = sum over (p, cin) of
        W[cout, cin, tap(o, p)] x[n, (p, cin)], where a pair the kernel does not reach (the
        zero padding) picks an appended all-zero tap."""
        n, c, h, w = x.shape
        taps, (ho, wo) = _tap_index(h, w, self.kernel_size, self.stride, self.padding, x.device)
        cout = self.out_channels
        weight = torch.cat([self.weight.flatten(2), self.weight.new_zeros(cout, c, 1)], dim=2)
        big = weight[:, :, taps].permute(2, 0, 3, 1).reshape(ho * wo * cout, h * w * c)
        y = nn.functional.linear(
            x.permute(0, 2, 3, 1).reshape(n, -1), big, None if self.bias is None else self.bias.repeat(ho * wo)
        )
        return y.view(n, ho, wo, cout).permute(0, 3, 1, 2)


class _WeightGradAsMatmul(torch.autograd.Function):
    """A convolution (groups 1, dilation 1) whose forward and input gradient are the usual
    kernels and whose weight gradient is one matrix product: the output gradient's rows
    (N x Ho x Wo, Cout) against the input's patches (N x Ho x Wo, kh x kw x Cin)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return nn.functional.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, ctx.stride, ctx.padding, (1, 1), False, (0, 0), 1, (True, False, False)
            )[0]
        if ctx.needs_input_grad[1]:
            cout, cin, kh, kw = weight.shape
            (sh, sw), (ph, pw) = ctx.stride, ctx.padding
            rows = nn.functional.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # N, H, W, C
            patches = rows.unfold(1, kh, sh).unfold(2, kw, sw)  # N, Ho, Wo, C, kh, kw
            patches = patches.permute(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * cin)
            product = grad.permute(0, 2, 3, 1).reshape(-1, cout).t() @ patches
            # in the weight's own strides (DDP's bucket views are made from them)
            grad_weight = torch.empty_like(weight).copy_(product.view(cout, kh, kw, cin).permute(0, 3, 1, 2))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None


def _tap(weight: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``weight[:, :, a, b]`` as a [cout, cin] matrix (a 1x1 kernel: ``a = b = 0``), through the
    views whose backward gives the gradient the weight's own strides. DDP compares a gradient's
    strides with its bucket views (made from the parameter's): a channels_last weight seen
    through contiguous-format indexing would get a contiguous gradient, and DDP would warn "Grad
    strides do not match bucket view strides" and copy it into the bucket."""
    if weight.stride(-1) != 1:  # channels_last: [cout, kh, kw, cin] is the contiguous view
        return weight.permute(0, 2, 3, 1)[:, a, b]
    return weight[:, :, a, b]


_TAPS: dict = {}


def _tap_index(h: int, w: int, kernel, stride, padding, device) -> tuple[torch.Tensor, tuple[int, int]]:
    """[output pixel, input pixel] -> index into the flattened kernel (k*k: outside it)."""
    key = (h, w, kernel, stride, padding, device)
    # Outside inference mode even when first met in evaluation: a cached inference tensor
    # could not be saved for a later training step's backward.
    with torch.inference_mode(False):
        if key not in _TAPS:
            _TAPS[key] = _taps(h, w, kernel, stride, padding, device)
    return _TAPS[key]


def _taps(h: int, w: int, kernel, stride, padding, device) -> tuple[torch.Tensor, tuple[int, int]]:
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    taps = torch.full((ho * wo, h * w), kh * kw, dtype=torch.long)
    for i in range(ho):
        for j in range(wo):
            for r in range(h):
                for q in range(w):
                    a, b = r - i * sh + ph, q - j * sw + pw
                    if 0 <= a < kh and 0 <= b < kw:
                        taps[i * wo + j, r * w + q] = a * kw + b
    return taps.to(device), (ho, wo)


def matmul_convs(model: nn.Module) -> nn.Module:
    """Every Conv2d of model as a MatmulConv2d (same module, parameters and state_dict)."""
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = MatmulConv2d
    return model


def prepare(model: nn.Module, device: torch.device, channels_last: bool, sync_bn: bool, distributed: bool) -> nn.Module:
    """Move to the device in the chosen memory format; convert BN to SyncBN when asked; on
    CPUs, convolutions as matrix products where those are faster (``MatmulConv2d``)."""
    if device.type == "cpu":
        matmul_convs(model)
    if sync_bn and distributed:
        if device.type != "cuda":
            raise UserError(
                "--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); drop --sync-bn on CPU runs"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device=device, memory_format=memory_format(channels_last))


def build(cfg, classes: list[str], image_size: int, ctx, pretrained=None) -> nn.Module:
    """The run's model for these classes, on its device, starting from ``pretrained``
    (``weights.Pretrained``) when given, ready to load a checkpoint into."""
    stem = weights.use_cifar_stem(pretrained, cfg.model.cifar_stem, use_cifar_stem(cfg.model.cifar_stem, image_size))
    model = build_model(cfg.model.arch, len(classes), stem, cfg.model.zero_init_residual, cfg.model.blurpool)
    if pretrained is not None and pretrained.state:
        weights.load_into(model, pretrained, classes, announce=ctx.is_main)
    return prepare(model, ctx.device, cfg.model.channels_last, cfg.model.sync_bn, ctx.distributed)


def describe(
    model: nn.Module,
    arch: str,
    classes: list[str],
    mean,
    std,
    image_size: int,
    resize: int = 0,
    train_image_size: int | None = None,
) -> dict:
    """What evaluate, predict and export need to rebuild and feed the model, kept in every
    checkpoint and export: with it a model file stands alone. ``image_size`` and ``resize``
    are evaluation's centre crop and the shorter side before it (0: the default for the
    crop); ``train_image_size``, the (final) training crop, is only a record."""
    from distres.data.transforms import eval_size

    return {
        "arch": arch,
        "classes": list(classes),
        "num_classes": len(classes),
        "cifar_stem": isinstance(model.maxpool, nn.Identity),
        "mean": list(mean),
        "std": list(std),
        "image_size": image_size,
        "resize": eval_size(image_size, resize),
        "train_image_size": train_image_size or image_size,
        "blurpool": any(isinstance(m, BlurConv2d) for m in model.modules()),
    }


def from_description(meta: dict) -> nn.Module:
    """A plain torchvision model (no CPU matmul convolutions: exports trace it) for meta."""
    return build_model(meta["arch"], meta["num_classes"], meta["cifar_stem"], blurpool=meta.get("blurpool", False))


def set_backbone_trainable(model: nn.Module, trainable: bool) -> bool:
    """Freeze or unfreeze every parameter but the classifier head; whether anything changed
    (DDP must then be rebuilt: it registers the parameters that need gradients once)."""
    changed = False
    for name, p in model.named_parameters():
        if not name.startswith(weights.HEAD) and p.requires_grad != trainable:
            p.requires_grad_(trainable)
            changed = True
    return changed


class CommProbe:
    """DDP's gradient all-reduce as a comm hook that skips it while ``skip`` is set: the step
    then keeps this rank's own gradients, as under ``no_sync()``. ``--bench-comm-probe`` sets it
    for every other log window (``perf.StepMeter``), so that benchmarks/scaling.py can tell the
    communication that backward could not hide from the compute."""

    def __init__(self):
        self.skip = False
        self.allreduce = default_hooks.allreduce_hook  # (the default group's, as DDP's own)

    @staticmethod
    def hook(probe: CommProbe, bucket):
        """The comm hook, with the probe as its state (DDP wants a plain named function)."""
        if probe.skip:
            done = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done
        return probe.allreduce(None, bucket)


def parallelize(model: nn.Module, cfg, ctx, comm_probe: CommProbe | None = None) -> nn.Module:
    """DDP across the processes (when there are several), with ``comm_probe`` as its comm hook
    when given, then torch.compile (when asked)."""
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            bucket_cap_mb=cfg.dist.bucket_cap_mb,
            # Gradients become views into the all-reduce buckets: one copy less per step.
            gradient_as_bucket_view=True,
            static_graph=cfg.dist.static_graph,
            # Passed only to turn it off: recent torch warns whenever the flag is given.
            **({} if cfg.dist.broadcast_buffers else {"broadcast_buffers": False}),
        )
        if comm_probe is not None:
            model.register_comm_hook(comm_probe, CommProbe.hook)
    if cfg.model.compile:
        schedule = cfg.data.resize_schedule
        if schedule is not None:
            # --progressive-resize: one static graph per training size (a few multiples of 32), each
            # compiled once when its first epoch starts, rather than a dynamic-shape graph that is
            # slower at every size; the limit makes room for them beside evaluation's shapes.
            sizes = len(set(schedule.sizes(cfg.optim.epochs)))
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * sizes + 8)
        model = torch.compile(
            model,
            mode=None if cfg.model.compile_mode == "default" else cfg.model.compile_mode,
            dynamic=False if schedule is not None else None,
        )
    return model


def _layers(model: nn.Module):
    """The model and every module it wraps, outermost first (torch.compile wraps DDP)."""
    while True:
        yield model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile (for checkpoints and evaluation)."""
    *_, plain = _layers(model)
    return plain


def find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper inside model (itself, or under torch.compile), or None."""
    return next((m for m in _layers(model) if isinstance(m, nn.parallel.DistributedDataParallel)), None)

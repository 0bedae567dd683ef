"""Starting weights (``--weights``) and the model files distres reads back.

``resolve`` finds the weights a run starts from: torchvision's ImageNet weights for the arch
(through torchvision's weight enums and the hub cache, ``$TORCH_HOME/hub/checkpoints``), or a
file: a torchvision-style state dict, a distres checkpoint (its EMA weights when it has them),
or a ``.safetensors`` file (a distres export, or any torchvision-style one). ``load_into`` puts
them into a freshly built model: every tensor must fit, except the classifier head, which is
replaced (and said so) when the class count differs. Nothing is ever half-loaded.

``read_model_file`` is what evaluate, predict and export share: a trained model's weights and
its description (``models.describe``: arch, classes, normalisation, input size).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from distres import dist
from distres.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from distres.errors import UserError, console

# torchvision's best weights for each arch (the V2 recipe where there is one).
IMAGENET_WEIGHTS = {"resnet50": "IMAGENET1K_V2", "resnext50_32x4d": "IMAGENET1K_V2", "resnet18": "IMAGENET1K_V1"}
HEAD = "fc."  # the classifier of torchvision's ResNets
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile, in state dicts saved from them
DOWNLOAD_TIMEOUT_S = 60


@dataclass
class Pretrained:
    state: dict  # plain parameter names -> tensors (CPU)
    source: str  # for messages: "ImageNet (IMAGENET1K_V2)", a path
    mean: tuple[float, ...]
    std: tuple[float, ...]
    meta: dict | None = None  # a distres model's description, when the file has one

    @property
    def cifar_stem(self) -> bool:
        """Whether the weights come from a model with the CIFAR stem (a 3x3 first convolution)."""
        if not self.state and self.meta:  # (a resumed run: the checkpoint's description)
            return bool(self.meta["cifar_stem"])
        conv1 = self.state.get("conv1.weight")
        return conv1 is not None and tuple(conv1.shape[-2:]) == (3, 3)

    @property
    def num_classes(self) -> int | None:
        head = self.state.get(HEAD + "weight")
        return None if head is None else int(head.shape[0])


def resolve(cfg, ctx, resumed: dict | None = None) -> Pretrained | None:
    """The weights ``--weights`` names, on every rank (None for ``none``). ``resumed``: the
    description in the checkpoint a resumed run continues from; its stem and normalisation
    stand in for the file's (no tensors: the checkpoint holds every weight)."""
    if cfg.finetune.weights == "none":
        return None
    if resumed is not None:
        return Pretrained({}, cfg.finetune.weights, tuple(resumed["mean"]), tuple(resumed["std"]), resumed)
    if cfg.finetune.weights == "imagenet":
        return _imagenet(cfg.model.arch, ctx)
    path = Path(cfg.finetune.weights)
    if not path.exists():
        raise UserError(f"--weights {path} does not exist; pass none, imagenet or the path of a weights file")
    return read_weights(path)


def imagenet_file(arch: str) -> tuple[Path, str, str]:
    """(where torchvision's hub cache keeps the file, its URL, the enum's name) for arch."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    weights = enum[IMAGENET_WEIGHTS[arch]]
    name = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name, weights.url, f"{enum.__name__}.{weights.name}"


def _imagenet(arch: str, ctx) -> Pretrained:
    path, url, label = imagenet_file(arch)
    # One download per node: the other ranks wait for it, then read the cached file.
    error = None
    if ctx.local_rank == 0 and not path.exists():
        error = _download(url, path)
    errors = [e for e in dist.gather_objects(error) if e]
    if errors:
        raise UserError(errors[0])
    if not path.exists():  # a node-local cache on which this node's download did not run
        raise UserError(f"{path} is missing on this node; put {path.name} there (TORCH_HOME)")
    state = _torch_load(path, "--weights imagenet")
    return Pretrained(_plain_keys(state), f"ImageNet ({label})", IMAGENET_MEAN, IMAGENET_STD)


def _download(url: str, path: Path) -> str | None:
    """None when the file is in place; else the error line (offline machines end here)."""
    console(f"distres: downloading {url} to {path}")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a firewall that drops packets would hang forever
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=_hash_prefix(path.name), progress=False)
        return None
    except Exception as e:  # no network, proxy, hash mismatch, full disk: the fix is the same
        return (
            f"the ImageNet weights {path.name} are not in {path.parent} and could not be downloaded "
            f"({type(e).__name__}); offline, copy {path.name} (from {url}) into {path.parent} "
            "(set TORCH_HOME to use another cache folder)"
        )
    finally:
        socket.setdefaulttimeout(previous)


def _hash_prefix(name: str) -> str | None:
    # torchvision's file names end in the first digits of the file's SHA-256.
    stem = name.rsplit(".", 1)[0]
    return stem.rsplit("-", 1)[1] if "-" in stem else None


def read_weights(path: Path) -> Pretrained:
    """A weights file of any of the supported kinds, as plain tensors on the CPU."""
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
    else:
        state = _torch_load(path, f"--weights {path}")
        meta = state.get("meta") if isinstance(state, dict) else None
        state = _unwrap_container(state, path)
        if not _is_description(meta):  # other trainers keep their own "meta" (epoch, config, ...)
            meta = None
    if meta:
        return Pretrained(_plain_keys(state), str(path), tuple(meta["mean"]), tuple(meta["std"]), meta)
    # A torchvision-style state dict: torchvision's (and timm's) ResNets are ImageNet models.
    return Pretrained(_plain_keys(state), str(path), IMAGENET_MEAN, IMAGENET_STD)


def _torch_load(path: Path, what: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what}: {path} does not exist; check the path") from None
    except Exception as e:
        raise UserError(
            f"{what}: {path} is unreadable or not a PyTorch weights file ({type(e).__name__}); "
            "pass a state dict, a distres checkpoint or a .safetensors file"
        ) from None


def _is_description(meta) -> bool:
    return isinstance(meta, dict) and all(k in meta for k in ("mean", "std", "classes", "cifar_stem"))


def _read_safetensors(path: Path) -> tuple[dict, dict | None]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            text = (f.metadata() or {}).get("distres")
    except Exception as e:
        raise UserError(
            f"{path} is not a readable .safetensors file ({type(e).__name__}); "
            "re-export it or pass another weights file"
        ) from None
    try:
        meta = json.loads(text) if text else None
    except ValueError:
        meta = None
    return state, meta if _is_description(meta) else None


def _unwrap_container(state, path: Path) -> dict:
    """The state dict inside the usual containers: a distres checkpoint (its EMA weights when
    it has them), or {"state_dict": ...} / {"model": ...} as other trainers save."""
    if not isinstance(state, dict):
        raise UserError(
            f"{path} holds a {type(state).__name__}, not a state dict; pass a state dict, "
            "a distres checkpoint or a .safetensors file"
        )
    if "format" in state and "model" in state:  # a distres checkpoint
        return state["ema"] if state.get("ema") is not None else state["model"]
    for key in ("state_dict", "model", "model_ema", "state_dict_ema"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


def _plain_keys(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        if isinstance(value, torch.Tensor):
            out[key] = value
    return out


def use_cifar_stem(pre: Pretrained | None, setting: str, sized_for: bool) -> bool:
    """The stem of a run that starts from ``pre``: with ``--cifar-stem auto``, the weights'
    stem; an explicit setting that contradicts the weights is refused (a new first layer
    would throw away what the whole network learned to read from it)."""
    if pre is None:
        return sized_for
    if setting == "auto":
        if pre.cifar_stem != sized_for:
            console(
                f"distres: using the {'CIFAR' if pre.cifar_stem else 'ImageNet'} stem of --weights "
                f"{pre.source} (--cifar-stem auto would pick the {'CIFAR' if sized_for else 'ImageNet'} "
                "stem for this image size)"
            )
        return pre.cifar_stem
    wanted = setting == "on"
    if wanted != pre.cifar_stem:
        kind = "CIFAR (3x3, no max-pool)" if pre.cifar_stem else "ImageNet (7x7 + max-pool)"
        raise UserError(
            f"--weights {pre.source} has the {kind} stem but --cifar-stem {setting} asks for the other; "
            "drop --cifar-stem (auto follows the weights) or start from other weights"
        )
    return wanted


def load_into(model: torch.nn.Module, pre: Pretrained, classes: list[str], announce: bool = True) -> None:
    """Copy pre's tensors into model: all of them must fit, except the classifier head, which
    is left as initialised when the classes differ (in number, or by name where the weights
    name theirs: a distres model's)."""
    own = model.state_dict()
    state = dict(pre.state)
    why = None
    if pre.num_classes is not None and pre.num_classes != len(classes):
        why = f"has {pre.num_classes} classes, this run {len(classes)}"
    elif pre.meta and list(pre.meta.get("classes", classes)) != list(classes):
        why = f"has other classes ({_few(pre.meta['classes'])}) than this run ({_few(classes)})"
    new_head = why is not None
    if new_head:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD)}
        if announce:
            console(f"distres: new classifier head: --weights {pre.source} {why}; the head starts from random weights")
    # BatchNorm adds num_batches_tracked itself to state dicts saved before it existed.
    missing = [
        k
        for k in own
        if k not in state and not k.endswith("num_batches_tracked") and not (new_head and k.startswith(HEAD))
    ]
    unexpected = [k for k in state if k not in own]
    misfit = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or misfit:
        parts = [
            f"{what} {_few(keys)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misfit))
            if keys
        ]
        raise UserError(
            f"--weights {pre.source} does not fit this model: {'; '.join(parts)}; pass weights of the "
            "same --arch (torchvision's key names)"
        )
    model.load_state_dict(state, strict=False)


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


@dataclass
class ModelFile:
    state: dict  # plain parameter names -> tensors
    meta: dict  # models.describe
    weights: str  # "ema" or "raw"
    config: dict | None  # the training run's config, when the file has it


def read_model_file(path: Path, which: str = "auto") -> ModelFile:
    """A trained model: a distres checkpoint (step, last or best) or a distres .safetensors
    export. ``which``: auto (the EMA weights when present), ema or raw."""
    config = None
    if path.suffix == ".safetensors":
        if not path.exists():
            raise UserError(f"{path} does not exist; check --checkpoint")
        state, meta = _read_safetensors(path)
        kind = (meta or {}).get("weights", "raw")
    else:
        ckpt = _torch_load(path, "--checkpoint")
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise UserError(f"{path} is not a distres checkpoint; pass one from OUTPUT_DIR/checkpoints")
        meta, config = ckpt.get("meta"), ckpt.get("config")
        if ckpt.get("ema") is not None and which != "raw":
            state, kind = ckpt["ema"], "ema"
        else:  # best.pt holds one set of weights, named in its record
            state, kind = ckpt["model"], ckpt.get("best", {}).get("weights", "raw")
    if which not in ("auto", kind):
        raise UserError(
            f"{path} has no {which} weights (only {kind}); "
            f"{'train with --ema-decay' if which == 'ema' else 'use last.pt'} or drop --weights {which}"
        )
    if not meta:
        raise UserError(
            f"{path} carries no model description (classes, normalisation, input size); "
            "it was saved by an older distres: train again or fine-tune from it with --weights"
        )
    return ModelFile(_plain_keys(state), meta, kind, config)

"""Export a trained model for serving: safetensors, TorchScript or ONNX, each checked.

    python -m distres.export --checkpoint runs/x/checkpoints/best.pt --format onnx --output model.onnx

The exported model is a stock torchvision ResNet in fp32 that takes normalised N x 3 x S x S
images (S and the mean/std are in the metadata). Every export is read back and its logits
compared with the eager model's on real images (``--check-images``, default: images of the
model's validation set when its data folder is at hand); the largest difference is printed
and must stay under ``--atol``. The metadata (classes, mean/std, input size, arch) goes
into the file where the format has room for it, and always beside it as ``FILE.json``. Load a safetensors export into torchvision with one line::

    model = torchvision.models.resnet50(num_classes=N); model.load_state_dict(safetensors.torch.load_file(FILE))

(a model trained with the CIFAR stem needs that stem first; see the README).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from distres import inference, models
from distres.data import isolate
from distres.data.decode import decode_torchvision
from distres.data.formats import IMAGE_EXTENSIONS
from distres.errors import ArgumentParser, UserError, console, run_cli
from distres.files import atomic_write

FORMATS = ("safetensors", "torchscript", "onnx")
CHECK_IMAGES = 8


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m distres.export",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--checkpoint", required=True, help="a distres checkpoint (or .safetensors export)")
    p.add_argument("--format", choices=FORMATS, required=True, help="what to write")
    p.add_argument("--output", required=True, help="the file to write")
    p.add_argument("--weights", choices=inference.WEIGHT_CHOICES, default="auto", help=inference.WEIGHTS_HELP)
    p.add_argument(
        "--check-images",
        nargs="*",
        default=None,
        metavar="PATH",
        help="image files or folders for the parity check (default: the model's validation images)",
    )
    p.add_number("--atol", float, 1e-3, "largest logit difference the parity check accepts", at_least=0)
    return p


def check_inputs(paths: list[str] | None, trained: inference.Trained) -> tuple[torch.Tensor, str]:
    """Up to CHECK_IMAGES normalised real images, and where they came from."""
    files = inference.find_images(paths)[0] if paths is not None else _validation_files(trained.config)
    images = []
    for start in range(0, len(files), CHECK_IMAGES):
        chunk = files[start : start + CHECK_IMAGES]
        bad = isolate.probe(chunk, decode_torchvision)  # (a file may crash the decoder: tried apart first)
        for f in (f for f in chunk if f not in bad):
            try:
                images.append(inference.read_image(f, trained.meta))
            except Exception:  # an unreadable file is just not used for the check
                continue
        if len(images) >= CHECK_IMAGES:
            images = images[:CHECK_IMAGES]
            break
    if not images:
        if paths is not None:
            raise UserError(f"no readable images in --check-images {' '.join(paths)}; pass image files or folders")
        raise UserError(
            "the model's validation images are not at hand for the parity check; pass --check-images with a few images"
        )
    norm = inference.normalizer(trained.meta, torch.device("cpu"), channels_last=False)
    x, _ = norm(torch.stack(images), torch.zeros(0, dtype=torch.int64))
    where = (
        "--check-images"
        if paths is not None
        else f"{trained.config.data_dir or trained.config.dataset} validation images"
    )
    return x, where


def _validation_files(cfg) -> list[str]:
    if cfg.data.dataset == "synthetic" or not cfg.data.data_dir:
        return []
    root = Path(cfg.data.data_dir)
    split = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if split is None:
        return []
    # One or two per class, spread over the classes, rather than the first class's only.
    per_class = [
        sorted(str(f) for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)[:2]
        for d in sorted(split.iterdir())
        if d.is_dir()
    ]
    return [f for pair in zip(*per_class) for f in pair] if per_class else []


def export(a) -> float:
    trained = inference.load(a.checkpoint, a.weights, plain=True)
    model = trained.model.float()
    x, where = check_inputs(a.check_images, trained)
    out = Path(a.output)
    meta = {
        **trained.meta,
        "weights": trained.weights,
        "input": "N x 3 x S x S float32, RGB, (x/255 - mean) / std",
        "source": str(a.checkpoint),
    }
    with torch.inference_mode():
        expected = model(x)
    sidecar = out.with_name(out.name + ".json")
    if out.suffix == ".json":
        raise UserError(
            f"--output {out}: .json is the name of the metadata written beside the export; "
            f"name the file e.g. model.{a.format}"
        )
    try:  # the writers' own errors for an unwritable folder are not all OSErrors: try it first
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(sidecar, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    except OSError as e:
        raise UserError(f"cannot write --output {out} ({e.strerror or e}); choose a writable path") from None
    got = WRITERS[a.format](model, x, out, meta)
    if got is None:
        console(
            f"distres.export: {out} ({a.format}, {trained.weights} weights) written, parity NOT checked "
            f"(onnxruntime is not installed: pip install -e '.[export]'); metadata in {sidecar}"
        )
        return float("nan")
    diff = float((got - expected).abs().max())
    ok = diff <= a.atol
    console(
        f"distres.export: {out} ({a.format}, {trained.weights} weights): parity on {len(x)} {where}: "
        f"max |logit difference| {diff:.2e} {'<=' if ok else '>'} {a.atol:g}; metadata in {sidecar}"
    )
    if not ok:
        raise UserError(
            f"the {a.format} export's logits differ from the model's by {diff:.2e} (> --atol {a.atol:g}); "
            "do not serve it: report the versions of torch and the exporter"
        )
    return diff


def _safetensors(model, x, out: Path, meta: dict) -> torch.Tensor:
    from safetensors.torch import load_file, save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata={"distres": json.dumps(meta)}))
    fresh = models.from_description(meta)  # a new torchvision model, as a user would load it
    fresh.load_state_dict(load_file(str(out)))
    with torch.inference_mode():
        return fresh.eval()(x)


def _torchscript(model, x, out: Path, meta: dict) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice: it still is what C++ serving loads
        traced = torch.jit.trace(model, x[:2])
        atomic_write(out, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files={"distres.json": json.dumps(meta)}))
        loaded = torch.jit.load(str(out))
    with torch.inference_mode():
        return loaded(x)


def _onnx(model, x, out: Path, meta: dict) -> torch.Tensor | None:
    try:
        import onnx
    except ImportError:
        raise UserError("--format onnx needs the onnx packages: pip install -e '.[export]'") from None

    def write(tmp: Path) -> None:
        batch = torch.export.Dim("batch", min=1)
        program = torch.onnx.export(
            model,
            (x[:2],),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
            dynamo=True,
            verbose=False,
        )
        proto = program.model_proto
        proto.metadata_props.add(key="distres", value=json.dumps(meta))
        onnx.save(proto, str(tmp))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atomic_write(out, write)
    onnx.checker.check_model(str(out))
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


WRITERS = {"safetensors": _safetensors, "torchscript": _torchscript, "onnx": _onnx}


def main(argv: list[str] | None = None) -> int:
    def body():
        export(build_parser().parse_args(argv))

    return run_cli(body)


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()

"""A GPU image with only torch, torchvision, numpy and Pillow, simulated in a full environment:
with this folder on PYTHONPATH, the packages below are found only outside the interpreter's own
site-packages (e.g. where benchmarks/gpu.sh unpacks them from .gpu/wheels).

    PYTHONPATH=tools/bare-image DISTRES_GPU_DRY=1 bash benchmarks/gpu.sh first
"""

import importlib.machinery
import sys
import sysconfig

HIDDEN = {
    "yaml",
    "tqdm",
    "matplotlib",
    "pytest",
    "_pytest",
    "pluggy",
    "iniconfig",
    "pygments",
    "pytest_timeout",
    "tensorboard",
    "pynvml",
    "safetensors",
    "wandb",
    "onnx",
    "onnxscript",
    "onnxruntime",
}
SITE = sysconfig.get_paths()["purelib"]


class _Filtered(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN and path is None:
            path = [p for p in sys.path if not p.startswith(SITE)]
        return importlib.machinery.PathFinder.find_spec(name, path, target)


sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = _Filtered

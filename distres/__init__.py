"""distres: distributed ResNet-50 / ResNeXt-50 training with PyTorch DDP."""

__version__ = "0.1.0"
